"""A small hybrid transformers model (Qwen3-Next: gated-delta-rule and attention layers, random weights) run by
transformers' own torch path and through portable_attn side by side: greedy tokens, which backend ran each op,
prefill time and decode tokens per second. Used by `examples/hybrid_demo.py` and the `e2e` bench case."""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from . import transformers as pat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# 3 delta-rule layers per attention layer, as Qwen3-Next stacks them
LAYERS = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
# Qwen3-Next-80B-A3B's heads and head dims: its layers' states, caches and kernels at their real sizes (a gated delta
# rule state of 32 x 128 x 128 per sequence); the hidden size, depth, vocabulary and MLPs are small
HEADS = dict(num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
             linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128)


def build_model(dtype: torch.dtype = torch.float32, layers: int = 4, hidden: int = 256, seed: int = 0,
                device: str = "cpu"):
    """Qwen3-Next with random weights: `layers` layers (3 gated delta rule : 1 attention) with the real model's
    heads (HEADS), dense MLPs, eager path."""
    import transformers as tf

    config = tf.Qwen3NextConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, **HEADS,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
        shared_expert_intermediate_size=hidden, mlp_only_layers=list(range(layers)),  # dense MLPs
        layer_types=(LAYERS * layers)[:layers], pad_token_id=0, eos_token_id=None)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch: int, length: int, vocab: int, seed: int = 0):
    """`batch` random prompts, the i-th `i * length // (2 * batch)` tokens shorter, left padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = row * length // (2 * batch)
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


@dataclasses.dataclass
class Timing:
    prefill_s: float       # median time to the first new token (the forward over the prompts, cache filled)
    decode_tok_s: float    # generated tokens per second after the first (batch included), from the median step
    tokens: torch.Tensor   # the greedy generation


class _TokenClock:
    """A generate() streamer that notes when each token arrives: the prompt first, then one per step."""

    def __init__(self):
        self.times = []

    def put(self, value):
        if value.is_cuda:  # the token is known once the GPU has computed it
            torch.cuda.synchronize(value.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _generate(model, ids, mask, new_tokens: int, streamer=None):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              streamer=streamer)


def _timed(model, ids, mask, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(seconds to the first new token, seconds per later step, the tokens) of one generate()."""
    clock = _TokenClock()
    start = time.perf_counter()
    tokens = _generate(model, ids, mask, new_tokens, clock)
    first, last = clock.times[1], clock.times[-1]
    return first - start, (last - first) / (new_tokens - 1), tokens


def _summary(runs: list, batch: int) -> Timing:
    return Timing(statistics.median(r[0] for r in runs), batch / statistics.median(r[1] for r in runs), runs[-1][2])


def compare(dtype: torch.dtype, backend=None, batch: int = 8, prompt: int = 256, new_tokens: int = 16,
            repeats: int = 3, device: str = "cpu", **model_kwargs):
    """(transformers' Timing, portable_attn's Timing, {op: backend}) for the demo model: each repeat runs one
    generate() per path, interleaved, and times every token as it arrives."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens: a decode rate needs at least 2 new tokens, got {new_tokens}")
    model = build_model(dtype, device=device, **model_kwargs)
    ids, mask = (x.to(device) for x in prompts(batch, prompt, model.config.vocab_size))
    base, ours = [], []
    for i in range(repeats + 1):  # the first round warms both paths (lazy imports, allocator)
        run = _timed(model, ids, mask, new_tokens)
        with pat.patch(model, backend=backend):
            mine = _timed(model, ids, mask, new_tokens)
        if i:
            base.append(run)
            ours.append(mine)
    return _summary(base, batch), _summary(ours, batch), pat.backends_used()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="portable-attn demo", description=__doc__)
    parser.add_argument("--backend", default=None, help="portable_attn backend (default: the best one here)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256, help="tokens of the longest prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="torch device of the model (e.g. cuda)")
    args = parser.parse_args(argv)
    base, ours, used = compare(DTYPES[args.dtype], args.backend, args.batch, args.prompt, args.new_tokens,
                               layers=args.layers, device=args.device)
    print(f"Qwen3-Next, {args.layers} layers (3 gated delta rule : 1 attention, the real model's heads), random "
          f"weights, {args.dtype} on {args.device}, "
          f"batch {args.batch}, prompts up to {args.prompt} tokens (left padded), {args.new_tokens} new tokens")
    for op, name in sorted(used.items()):
        print(f"  {op:24s} ran on portable_attn backend {name!r}")
    print(f"  {'':24s} {'prefill ms':>12s} {'decode tok/s':>14s}")
    for label, t in (("transformers (torch)", base), ("portable_attn", ours)):
        print(f"  {label:24s} {1e3 * t.prefill_s:12.1f} {t.decode_tok_s:14.1f}")
    same = torch.equal(base.tokens, ours.tokens)
    print(f"  speedup: prefill {base.prefill_s / ours.prefill_s:.2f}x, decode "
          f"{ours.decode_tok_s / base.decode_tok_s:.2f}x; same greedy tokens: {'yes' if same else 'NO'}")
    return 0 if same or args.dtype != "fp32" else 1
