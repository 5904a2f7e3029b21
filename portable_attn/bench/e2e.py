"""Bench case `e2e`: the hybrid demo model (Qwen3-Next, random weights; portable_attn/integrations/demo.py)
end to end, portable_attn versus transformers' default torch path: prefill time and decode tokens/s, fp32
and bf16, medians of repeated runs. `python -m portable_attn.bench.e2e [--quick] [--backend NAME] [--device cuda]`."""
from __future__ import annotations

import argparse
import json

from ..integrations import demo

SIZES = {"full": dict(batch=8, prompt=256, new_tokens=16, repeats=5),
         "quick": dict(batch=2, prompt=32, new_tokens=4, repeats=1, layers=4, hidden=64)}


def run(dtypes=("fp32", "bf16"), backend=None, quick: bool = False, prompt: int | None = None,
        device: str = "cpu") -> list[dict]:
    """One row per dtype: both paths' prefill ms and decode tok/s, the speedups, and the backends used
    (`prompt`: the longest prompt's tokens instead of the size's)."""
    sizes = SIZES["quick" if quick else "full"] | ({"prompt": prompt} if prompt else {})
    rows = []
    for name in dtypes:
        base, ours, used = demo.compare(demo.DTYPES[name], backend, device=device, **sizes)
        rows.append({
            "case": "e2e", "device": device, "dtype": name, **{k: v for k, v in sizes.items() if k != "repeats"},
            "transformers_prefill_ms": 1e3 * base.prefill_s, "portable_attn_prefill_ms": 1e3 * ours.prefill_s,
            "transformers_decode_tok_s": base.decode_tok_s, "portable_attn_decode_tok_s": ours.decode_tok_s,
            "prefill_speedup": base.prefill_s / ours.prefill_s,
            "decode_speedup": ours.decode_tok_s / base.decode_tok_s,
            "same_tokens": bool((base.tokens == ours.tokens).all()), "backends": used,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default="cpu", help="torch device of the model (e.g. cuda)")
    parser.add_argument("--dtype", action="append", choices=sorted(demo.DTYPES))
    parser.add_argument("--quick", action="store_true", help="a tiny model and one repeat (a smoke run)")
    parser.add_argument("--prompt", type=int, default=None,
                        help=f"tokens of the longest prompt (default {SIZES['full']['prompt']}; quick "
                             f"{SIZES['quick']['prompt']})")
    args = parser.parse_args(argv)
    for dtype in args.dtype or ("fp32", "bf16"):  # a row as soon as it is measured (a time-limited run keeps it)
        (row,) = run((dtype,), args.backend, args.quick, args.prompt, args.device)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
