"""Benchmark cases: one op in one pattern, its sizes per point, and the FLOPs (and bytes) of the visible work.

FLOPs count a multiply-add as two and only the work the op's contract asks for: attention counts
`QK^T` and `PV` over the visible (query, key) pairs; the recurrences count the token-by-token update
(`gdr`: decay, `S^T k`, the rank-1 update and `S^T q`, 7·K·V per token and value head; `ssd`: decay,
`dt·x B^T` and `h C`, 5·P·N per token and head; `gla`: decay, `k^T v` and `q S`, 5·K·V; conv: 2·W per
token and channel), whatever a chunked algorithm does on top. Bytes (memory-bound cases only) count
what one call must read and write once: inputs, outputs, and a state cache read and written back.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Point:
    sizes: dict
    x: int | str  # the value on the case's series axis (the host case: the op)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: str                       # the portable_attn op
    pattern: str
    axis: str                     # the size `Point.x` is ("T", "ctx")
    baseline: str | None          # the implementation the ratios are against (None: no peer to compare with)
    peers: tuple[str, ...]
    points: tuple[Point, ...]
    make: Callable[[dict, str], dict]          # (sizes, device) -> the op's arguments
    flops: Callable[[dict], float]
    bytes: Callable[[dict], float] | None = None  # memory-bound cases: what one call must read and write
    graph: bool = False  # on CUDA, timed as replays of a CUDA graph of several calls (as engines run decode)

    def label(self, point: Point) -> str:
        return f"{self.axis}={point.x}"


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _dtype(sizes: dict) -> torch.dtype:
    return DTYPES[sizes.get("dtype", "fp32")]


def _on(device: str, sizes: dict, acts: dict, params: dict) -> dict:
    """Activations in the case's dtype, gates/parameters/states in float32, all on `device`."""
    return ({n: t.to(device, _dtype(sizes)) for n, t in acts.items()}
            | {n: t.to(device, torch.float32) for n, t in params.items()})


def _uniform(gen, lo, hi, *shape):
    return lo + (hi - lo) * torch.rand(*shape, generator=gen)


def _rows(sizes: dict) -> int:
    """Tokens of one call: the sequence length, or the batch of a step (one token per sequence)."""
    return sizes["T"] if "T" in sizes else sizes["B"]


def _visible_pairs(T: int, left: int) -> int:
    """(query, key) pairs of causal attention over T tokens, keys at most `left` behind (-1: unbounded)."""
    if left < 0 or left >= T:
        return T * (T + 1) // 2
    return left * (left + 1) // 2 + (T - left) * (left + 1)


def _attention_inputs(sizes: dict, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    T, H, D = sizes["T"], sizes["H"], sizes["D"]
    hkv = sizes.get("Hkv", H)
    q, k, v = (_randn(gen, T, h, D).to(device, _dtype(sizes)) for h in (H, hkv, hkv))
    left = sizes["W"] - 1 if "W" in sizes else -1
    return dict(q=q, k=k, v=v, causal=True, window_size=(left, 0 if left >= 0 else -1),
                **({"softcap": sizes["softcap"]} if "softcap" in sizes else {}))


def _attention_flops(sizes: dict) -> float:
    left = sizes["W"] - 1 if "W" in sizes else -1
    return 4.0 * sizes["H"] * sizes["D"] * _visible_pairs(sizes["T"], left)


def _local_global_mask(sizes: dict):
    """Longformer's pattern: keys within W of the query, plus the first G tokens seeing and seen by all."""
    from portable_attn.masks import BlockMask

    return BlockMask.local_global(sizes["T"], sizes["W"], range(sizes["G"]), (sizes["BS"], sizes["BS"]))


def _block_mask_inputs(sizes: dict, device: str) -> dict:
    args = _attention_inputs({k: v for k, v in sizes.items() if k != "W"}, device)
    return args | dict(causal=False, window_size=(-1, -1), block_mask=_local_global_mask(sizes).to(device))


def _block_mask_flops(sizes: dict) -> float:
    T, W, G = sizes["T"], sizes["W"], sizes["G"]
    p = torch.arange(T)
    lo, hi = (p - W).clamp(min=0), (p + W).clamp(max=T - 1)
    seen = hi - lo + 1 + (G - (hi.clamp(max=G - 1) - lo + 1).clamp(min=0).clamp(max=G))  # band + globals outside it
    seen = torch.where(p < G, T, seen)
    return 4.0 * sizes["H"] * sizes["D"] * float(seen.sum())


def _decode_inputs(sizes: dict, device: str) -> dict:
    B, ctx, BS = sizes["B"], sizes["ctx"], sizes["BS"]
    gen = torch.Generator().manual_seed(0)
    per_seq = -(-ctx // BS)  # the last block partly used when BS does not divide ctx
    if sizes.get("heads_major"):  # stored [NB, Hkv, BS, D] (vLLM's CPU layout, IPEX's), passed as the SPEC view
        k_cache, v_cache = (_randn(gen, B * per_seq, sizes["Hkv"], BS, sizes["D"]).to(device, _dtype(sizes))
                            .transpose(1, 2) for _ in range(2))
    else:
        k_cache, v_cache = (_randn(gen, B * per_seq, BS, sizes["Hkv"], sizes["D"]).to(device, _dtype(sizes))
                            for _ in range(2))
    table = torch.randperm(B * per_seq, generator=gen).view(B, per_seq).to(torch.int32)  # pages out of order
    return dict(q=_randn(gen, B, sizes["Hq"], sizes["D"]).to(device, _dtype(sizes)), k_cache=k_cache, v_cache=v_cache,
                block_table=table.to(device), seqused_k=torch.full((B,), ctx, dtype=torch.int32, device=device),
                max_seqlen_k=ctx)


def _decode_query_inputs(sizes: dict, device: str) -> dict:
    """A decode step through `attention`: one query at the end of a causal sequence of Tk keys."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(gen, n, h, sizes["D"]).to(device, _dtype(sizes))
               for n, h in ((1, sizes["Hq"]), (sizes["Tk"], sizes["Hkv"]), (sizes["Tk"], sizes["Hkv"])))
    return dict(q=q, k=k, v=v, causal=True)


def _decode_query_flops(sizes: dict) -> float:
    return 4.0 * sizes["Hq"] * sizes["D"] * sizes["Tk"]


def _decode_flops(sizes: dict) -> float:
    return 4.0 * sizes["B"] * sizes["Hq"] * sizes["D"] * sizes["ctx"]


def _decode_bytes(sizes: dict) -> float:
    kv = 2 * sizes["B"] * sizes["ctx"] * sizes["Hkv"] * sizes["D"]
    q_and_out = 2 * sizes["B"] * sizes["Hq"] * sizes["D"]
    return _dtype(sizes).itemsize * (kv + q_and_out) + 4 * sizes["B"] * (sizes["ctx"] // sizes["BS"] + 1)  # + block table, lengths


def _gdr_inputs(sizes: dict, device: str) -> dict:
    n, H, Hv, K, V = _rows(sizes), sizes["H"], sizes.get("Hv", sizes["H"]), sizes["K"], sizes["V"]
    gen = torch.Generator().manual_seed(0)
    acts = dict(q=_randn(gen, n, H, K), k=_randn(gen, n, H, K), v=_randn(gen, n, Hv, V),
                beta=torch.sigmoid(_randn(gen, n, Hv)))
    params = dict(g=F.logsigmoid(_randn(gen, n, Hv)))
    if "B" in sizes:
        params["state"] = 0.1 * _randn(gen, n, Hv, K, V)
    return _on(device, sizes, acts, params) | dict(use_qk_l2norm=True)


def _gdr_flops(sizes: dict) -> float:
    return 7.0 * _rows(sizes) * sizes.get("Hv", sizes["H"]) * sizes["K"] * sizes["V"]


def _gdr_step_bytes(sizes: dict) -> float:
    B, H, Hv, K, V = sizes["B"], sizes["H"], sizes["Hv"], sizes["K"], sizes["V"]
    act = _dtype(sizes).itemsize * B * (2 * H * K + 2 * Hv * V + Hv)  # q, k, v, out, beta
    return act + 4 * B * Hv * (2 * K * V + 1) + 4 * B  # state read + written, g, state_indices


def _ssd_inputs(sizes: dict, device: str) -> dict:
    n, H, P, N, G = _rows(sizes), sizes["H"], sizes["P"], sizes["N"], sizes["G"]
    gen = torch.Generator().manual_seed(0)
    acts = dict(x=_randn(gen, n, H, P), dt=0.5 * _randn(gen, n, H), B=_randn(gen, n, G, N), C=_randn(gen, n, G, N))
    params = dict(A=-_uniform(gen, 1.0, 16.0, H), D=_randn(gen, H),  # Mamba-2's init ranges
                  dt_bias=torch.log(torch.expm1(_uniform(gen, 1e-3, 0.1, H))))
    if "B" in sizes:
        params["state"] = 0.1 * _randn(gen, n, H, P, N)
    return _on(device, sizes, acts, params) | dict(dt_softplus=True)


def _ssd_flops(sizes: dict) -> float:
    return 5.0 * _rows(sizes) * sizes["H"] * sizes["P"] * sizes["N"]


def _ssd_step_bytes(sizes: dict) -> float:
    B, H, P, N, G = sizes["B"], sizes["H"], sizes["P"], sizes["N"], sizes["G"]
    act = _dtype(sizes).itemsize * B * (2 * H * P + H + 2 * G * N)  # x, y, dt, B, C
    return act + 4 * (2 * B * H * P * N + 3 * H) + 4 * B  # state read + written, A, D, dt_bias, state_indices


def _gla_inputs(sizes: dict, device: str) -> dict:
    n, H, K, V = _rows(sizes), sizes["H"], sizes["K"], sizes["V"]
    gen = torch.Generator().manual_seed(0)
    acts = dict(q=_randn(gen, n, H, K), k=_randn(gen, n, H, K), v=_randn(gen, n, H, V))
    params = dict(g=F.logsigmoid(_randn(gen, n, H, K)) / 16)  # GLA's gate_logit_normalizer
    if "B" in sizes:
        params["state"] = 0.1 * _randn(gen, n, H, K, V)
    return _on(device, sizes, acts, params)


def _gla_flops(sizes: dict) -> float:
    return 5.0 * _rows(sizes) * sizes["H"] * sizes["K"] * sizes["V"]


def _gla_step_bytes(sizes: dict) -> float:
    B, H, K, V = sizes["B"], sizes["H"], sizes["K"], sizes["V"]
    act = _dtype(sizes).itemsize * B * H * (2 * K + 2 * V)  # q, k, v, out
    return act + 4 * B * H * (2 * K * V + K) + 4 * B  # state read + written, g, state_indices


def _conv_inputs(sizes: dict, device: str) -> dict:
    n, C, W = _rows(sizes), sizes["C"], sizes["W"]
    gen = torch.Generator().manual_seed(0)
    acts = dict(x=_randn(gen, n, C), weight=_randn(gen, C, W) / W, bias=_randn(gen, C))
    if "B" in sizes:
        acts["state"] = _randn(gen, n, C, W - 1)  # the activation dtype, as SPEC's conv state is
    return _on(device, sizes, acts, {}) | dict(activation="silu")


def _conv_flops(sizes: dict) -> float:
    return 2.0 * _rows(sizes) * sizes["C"] * sizes["W"]


def _conv_bytes(sizes: dict) -> float:
    n, C, W, item = _rows(sizes), sizes["C"], sizes["W"], _dtype(sizes).itemsize
    state = item * 2 * n * C * (W - 1) + 4 * n if "B" in sizes else 0  # read + written, state_indices
    return item * (2 * n * C + C * (W + 1)) + state  # x, y, weight, bias


def _series(axis, values, **fixed):
    return tuple(Point({axis: v} | fixed, v) for v in values)


def _bf16(points):
    """The same points with bfloat16 activations."""
    return tuple(Point(p.sizes | dict(dtype="bf16"), p.x) for p in points)


def gpu_catalogue() -> dict[str, Case]:
    """The GPU goals of the triton backend (bf16; on an H100): prefill as fast as SDPA (attention) and as
    flash-linear-attention's chunk kernels (recurrences), a 1k window at 32k far cheaper than the same
    kernel's dense causal run, decode and every step form near the memory bandwidth (batch 256 states)."""
    bf16 = dict(dtype="bf16")
    step = "one token per sequence, batch 256, state cache float32 updated in place, bf16, CUDA graph"
    cases = (
        Case("gpu_causal", "attention", "dense causal prefill, GQA 32/8, bf16", "T", "sdpa-causal",
             ("sdpa-causal", "flex", "flash-attn"), _series("T", (8192,), H=32, Hkv=8, D=128, **bf16),
             _attention_inputs, _attention_flops),
        Case("gpu_swa", "attention", "causal with a window W at T=32768 (W=T: dense), GQA 32/8, bf16", "W",
             "flex", ("flex", "flash-attn"), _series("W", (1024, 32768), T=32768, H=32, Hkv=8, D=128, **bf16),
             _attention_inputs, _attention_flops),
        Case("gpu_decode_b64", "paged_attention", "paged decode step, batch 64, GQA 32/8, bf16", "ctx",
             "gather-sdpa", ("gather-sdpa",), _series("ctx", (8192,), B=64, Hq=32, Hkv=8, D=128, BS=16, **bf16),
             _decode_inputs, _decode_flops, _decode_bytes),
        Case("gpu_ssd", "ssd", "Mamba-2 SSD prefill, one group (ngroups=1), dt softplus + bias, D skip, bf16", "T",
             "fla-ssd", ("fla-ssd", "hf-mamba2"), _series("T", (8192,), H=64, P=64, N=128, G=1, **bf16),
             _ssd_inputs, _ssd_flops),
        Case("gpu_gdr", "gated_delta_rule", "gated delta rule prefill, use_qk_l2norm, bf16", "T", "fla-gdr",
             ("fla-gdr", "hf-qwen3next"), _series("T", (8192,), H=16, K=128, V=128, **bf16), _gdr_inputs, _gdr_flops),
        Case("gpu_gla", "linear_attention", "GLA prefill: decay per key dim g [T, H, K], bf16", "T", "fla-gla",
             ("fla-gla",), _series("T", (8192,), H=16, K=128, V=128, **bf16), _gla_inputs, _gla_flops),
        Case("gpu_ssd_step", "ssd_step", f"Mamba-2 SSD step, one group, {step}", "B", "fla-ssd-step",
             ("fla-ssd-step",), _series("B", (256,), H=64, P=64, N=128, G=1, **bf16), _ssd_inputs, _ssd_flops,
             _ssd_step_bytes, graph=True),
        Case("gpu_gdr_step", "gated_delta_rule_step", f"gated delta rule step, GQA 16/32, use_qk_l2norm, {step}",
             "B", "fla-gdr-step", ("fla-gdr-step", "hf-qwen3next-step"),
             _series("B", (256,), H=16, Hv=32, K=128, V=128, **bf16), _gdr_inputs, _gdr_flops, _gdr_step_bytes,
             graph=True),
        Case("gpu_gla_step", "linear_attention_step", f"GLA step (decay per key dim), {step}", "B", "fla-gla-step",
             ("fla-gla-step",), _series("B", (256,), H=32, K=128, V=128, **bf16), _gla_inputs, _gla_flops,
             _gla_step_bytes, graph=True),
        Case("gpu_conv_step", "causal_conv1d_step", "causal conv1d step, silu, batch 256, state bf16 in place, "
             "CUDA graph", "B", "fla-conv-step", ("fla-conv-step", "hf-conv-step"),
             _series("B", (256,), C=8192, W=4, **bf16), _conv_inputs, _conv_flops, _conv_bytes, graph=True),
    )
    return {c.name: c for c in cases}


def catalogue(quick: bool = False) -> dict[str, Case]:
    """Every case by name; `quick` shrinks every size to seconds-long runs for tests and CI. The GPU cases
    (`gpu_catalogue`) run only when named with --case."""
    series = _series
    if quick:
        swa = series("T", (128, 256), H=2, D=16, W=32)
        causal = series("T", (128,), H=2, D=16)
        decode = series("ctx", (64, 256), B=2, Hq=4, Hkv=2, D=16, BS=16)
        decode_b64 = series("ctx", (128,), B=4, Hq=4, Hkv=2, D=16, BS=16)
        gdr = series("H", (2,), T=128, K=16, V=16)
        ssd = series("H", (2,), T=128, P=8, N=16, G=1)
        gla = series("H", (2,), T=128, K=16, V=16)
        softcap = series("T", (256,), H=2, D=16, W=32, softcap=50.0)
        block_mask = series("T", (256,), H=2, D=16, W=16, G=16, BS=16)
        conv = series("T", (128,), C=64, W=4)
        ssd_step = series("B", (4,), H=2, P=8, N=16, G=1)
        gdr_step = series("B", (4,), H=2, Hv=4, K=16, V=16)
        gla_step = series("B", (4,), H=2, K=16, V=16)
        conv_step = series("B", (4,), C=64, W=4)
    else:
        swa = series("T", (4096, 16384, 65536), H=8, D=64, W=1024)
        causal = series("T", (4096, 8192), H=8, D=64)
        decode = series("ctx", (1024, 4096, 16384, 65536), B=8, Hq=32, Hkv=8, D=128, BS=16)
        decode_b64 = series("ctx", (8192,), B=64, Hq=32, Hkv=8, D=128, BS=16)
        gdr = series("H", (8, 16), T=4096, K=128, V=128)
        ssd = series("H", (8, 16), T=4096, P=64, N=128, G=1)
        gla = series("H", (8, 16), T=4096, K=128, V=128)
        softcap = series("T", (16384,), H=8, D=64, W=1024, softcap=50.0)  # Gemma 2's attention softcap
        # 128-token blocks, keys within 640 and 128 global tokens: 10.5 % of the blocks visible
        block_mask = series("T", (16384,), H=8, D=64, W=640, G=128, BS=128)
        conv = series("T", (4096,), C=8192, W=4)
        ssd_step = series("B", (256,), H=32, P=64, N=128, G=1)  # states of 256 MiB each: half the GPU sizes
        gdr_step = series("B", (256,), H=8, Hv=16, K=128, V=128)
        gla_step = series("B", (256,), H=16, K=128, V=128)
        conv_step = series("B", (256,), C=8192, W=4)
    step = "one token per sequence, state cache float32 updated in place, fp32"
    cases = (
        Case("swa", "attention", "sliding window W, causal, window_size=(W-1, 0), fp32", "T", "flex",
             ("sdpa-mask", "flex"), swa, _attention_inputs, _attention_flops),
        Case("swa_bf16", "attention", "sliding window W, causal, window_size=(W-1, 0), bf16", "T", "flex", ("flex",),
             _bf16(swa[-2:-1] if not quick else swa), _attention_inputs, _attention_flops),
        Case("causal", "attention", "dense causal, fp32", "T", "sdpa-causal", ("sdpa-causal", "flex"), causal,
             _attention_inputs, _attention_flops),
        Case("causal_bf16", "attention", "dense causal, bf16", "T", "sdpa-causal", ("sdpa-causal", "flex"),
             _bf16(causal), _attention_inputs, _attention_flops),
        Case("softcap", "attention", "sliding window W with a logit softcap (tanh), fp32", "T", "cpu-no-softcap",
             ("cpu-no-softcap", "flex"), softcap, _attention_inputs, _attention_flops),
        Case("softcap_bf16", "attention", "sliding window W with a logit softcap (tanh), bf16", "T", "cpu-no-softcap",
             ("cpu-no-softcap", "flex"), _bf16(softcap), _attention_inputs, _attention_flops),
        Case("block_mask", "attention", "BlockMask local (|p - j| <= W) + global (first G tokens), not causal, fp32",
             "T", "flex", ("flex", "cpu-band"), block_mask, _block_mask_inputs, _block_mask_flops),
        Case("decode", "paged_attention", "paged decode step, one query per sequence, GQA, fp32", "ctx",
             "gather-sdpa", ("gather-sdpa",), decode, _decode_inputs, _decode_flops, _decode_bytes),
        Case("decode_b64", "paged_attention", "paged decode step, batch 64, GQA, fp32", "ctx", "gather-sdpa",
             ("gather-sdpa",), decode_b64, _decode_inputs, _decode_flops, _decode_bytes),
        Case("decode_b64_bf16", "paged_attention", "paged decode step, batch 64, GQA, bf16 caches", "ctx",
             "gather-sdpa", ("gather-sdpa",), _bf16(decode_b64), _decode_inputs, _decode_flops, _decode_bytes),
        Case("gdr", "gated_delta_rule", "gated delta rule prefill, use_qk_l2norm, fp32", "H", "hf-qwen3next",
             ("hf-qwen3next",), gdr, _gdr_inputs, _gdr_flops),
        Case("gdr_bf16", "gated_delta_rule", "gated delta rule prefill, use_qk_l2norm, bf16", "H", "hf-qwen3next",
             ("hf-qwen3next",), _bf16(gdr), _gdr_inputs, _gdr_flops),
        Case("ssd", "ssd", "Mamba-2 SSD prefill, dt softplus + bias, D skip, fp32", "H", "hf-mamba2",
             ("hf-mamba2",), ssd, _ssd_inputs, _ssd_flops),
        Case("ssd_bf16", "ssd", "Mamba-2 SSD prefill, dt softplus + bias, D skip, bf16", "H", "hf-mamba2",
             ("hf-mamba2",), _bf16(ssd), _ssd_inputs, _ssd_flops),
        Case("gla", "linear_attention", "GLA prefill: decay per key dim g [T, H, K], fp32 (no PyTorch peer)", "H",
             None, (), gla, _gla_inputs, _gla_flops),
        Case("gla_bf16", "linear_attention", "GLA prefill: decay per key dim g [T, H, K], bf16 (no PyTorch peer)",
             "H", None, (), _bf16(gla), _gla_inputs, _gla_flops),
        Case("conv", "causal_conv1d", "causal conv1d prefill, silu, fp32", "T", "torch-conv1d", ("torch-conv1d",), conv,
             _conv_inputs, _conv_flops, _conv_bytes),
        Case("ssd_step", "ssd_step", f"Mamba-2 SSD step, {step} (no PyTorch peer)", "B", None, (), ssd_step,
             _ssd_inputs, _ssd_flops, _ssd_step_bytes),
        Case("gdr_step", "gated_delta_rule_step", f"gated delta rule step, GQA 1:2, use_qk_l2norm, {step}", "B",
             "hf-qwen3next-step", ("hf-qwen3next-step",), gdr_step, _gdr_inputs, _gdr_flops, _gdr_step_bytes),
        Case("gla_step", "linear_attention_step", f"GLA step (decay per key dim), {step} (no PyTorch peer)", "B",
             None, (), gla_step, _gla_inputs, _gla_flops, _gla_step_bytes),
        Case("conv_step", "causal_conv1d_step", "causal conv1d step, silu, state in place, fp32", "B", "hf-conv-step",
             ("hf-conv-step",), conv_step, _conv_inputs, _conv_flops, _conv_bytes),
    )
    return {c.name: c for c in cases}


def _route_inputs(sizes: dict, device: str) -> dict:
    """Causal attention with the case's feature: a window W, sinks, or a local + global block mask."""
    args = _attention_inputs(sizes, device)
    if sizes.get("sinks"):
        args["sinks"] = _randn(torch.Generator().manual_seed(1), sizes["H"]).to(device)
    if "local" in sizes:
        args["block_mask"] = _route_mask(sizes).to(device)
    return args


def _route_mask(sizes: dict):
    from portable_attn.masks import BlockMask

    return BlockMask.local_global(sizes["T"], sizes["local"], range(0, sizes["T"], sizes["T"] // 16))


def _route_flops(sizes: dict) -> float:
    if "local" not in sizes:
        return _attention_flops(sizes)
    pos = torch.arange(sizes["T"])
    pairs = int((_route_mask(sizes).visible(0, pos, pos)[0] & (pos[None, :] <= pos[:, None])).sum())
    return 4.0 * sizes["H"] * sizes["D"] * pairs


def route_catalogue(quick: bool = False) -> dict[str, Case]:
    """One call of each kind a platform's default route must choose for (dense, window, sinks, block mask,
    paged decode), in fp32 and bf16 (the points): `portable-attn bench --case route_dense route_swa
    route_sinks route_mask route_decode --backend cpu torch` measures the CPU defaults, cpu as baseline;
    route_decode_hm is decode on the cache layout the ipex backend reads."""
    def dtypes(**fixed):
        return tuple(Point(fixed | dict(dtype=d), d) for d in ("fp32", "bf16"))
    if quick:
        attn, decode = dict(T=128, H=4, Hkv=2, D=16), dict(B=2, ctx=64, Hq=4, Hkv=2, D=16, BS=16)
        w, local = 32, 16
    else:
        attn, decode = dict(T=4096, H=8, Hkv=2, D=64), dict(B=8, ctx=4096, Hq=32, Hkv=8, D=128, BS=16)
        w, local = 1024, 256
    cases = (
        Case("route_dense", "attention", "dense causal, GQA 8/2", "dtype", "cpu", ("sdpa-causal",), dtypes(**attn),
             _route_inputs, _route_flops),
        Case("route_swa", "attention", f"causal, window_size=({w - 1}, 0), GQA 8/2", "dtype", "cpu", (),
             dtypes(**attn, W=w), _route_inputs, _route_flops),
        Case("route_sinks", "attention", "dense causal with a sink logit per head, GQA 8/2", "dtype", "cpu", (),
             dtypes(**attn, sinks=True), _route_inputs, _route_flops),
        Case("route_mask", "attention", f"causal, local_global block mask (|p - j| <= {local}, 16 global tokens)",
             "dtype", "cpu", (), dtypes(**attn, local=local), _route_inputs, _route_flops),
        Case("route_decode", "paged_attention", "paged decode step, batch 8, GQA 32/8", "dtype", "cpu",
             ("gather-sdpa",), dtypes(**decode), _decode_inputs, _decode_flops, _decode_bytes),
        Case("route_decode_hm", "paged_attention", "paged decode step, batch 8, GQA 32/8, cache stored heads-major "
             "[NB, Hkv, BS, D] (the layout IPEX reads)", "dtype", "cpu", (), dtypes(**decode, heads_major=True),
             _decode_inputs, _decode_flops, _decode_bytes),
    )
    return {c.name: c for c in cases}


# The host case's calls: the op of each point, its inputs and FLOPs.
HOST_CALLS = {
    "attention": (_decode_query_inputs, _decode_query_flops),
    "paged_attention": (_decode_inputs, _decode_flops),
    "gated_delta_rule_step": (_gdr_inputs, _gdr_flops),
    "ssd_step": (_ssd_inputs, _ssd_flops),
    "causal_conv1d_step": (_conv_inputs, _conv_flops),
}


def host_case(quick: bool = False) -> Case:
    """Decode-sized calls, one op per point (`Point.x` is the op, `sizes["op"]` too): what bench/host.py
    times against the kernel each call ends in. Full sizes are one layer of a real model: Llama-style GQA
    32/8 over 100 tokens, Qwen3-Next's gated delta rule, Mamba-2's SSD and conv, batch 8."""
    if quick:
        sizes = dict(attention=dict(Tk=20, Hq=4, Hkv=2, D=16),
                     paged_attention=dict(B=2, ctx=20, Hq=4, Hkv=2, D=16, BS=16),
                     gated_delta_rule_step=dict(B=2, H=2, Hv=4, K=16, V=16), ssd_step=dict(B=2, H=2, P=8, N=16, G=1),
                     causal_conv1d_step=dict(B=2, C=64, W=4))
    else:
        sizes = dict(attention=dict(Tk=100, Hq=32, Hkv=8, D=128),
                     paged_attention=dict(B=8, ctx=100, Hq=32, Hkv=8, D=128, BS=16),
                     gated_delta_rule_step=dict(B=8, H=16, Hv=32, K=128, V=128),
                     ssd_step=dict(B=8, H=32, P=64, N=128, G=1), causal_conv1d_step=dict(B=8, C=4096, W=4))
    return Case("host", "one per point", "host overhead of decode-sized calls over the kernel each ends in, checks "
                "on and off, fp32", "op", None, (), tuple(Point(dict(op=op) | s, op) for op, s in sizes.items()),
                lambda s, device: HOST_CALLS[s["op"]][0](s, device), lambda s: HOST_CALLS[s["op"]][1](s))


def named(quick: bool = False) -> dict[str, Case]:
    """Every case that --case may name: the default ones, the GPU ones, the route ones and `host`."""
    return catalogue(quick) | gpu_catalogue() | route_catalogue(quick) | {"host": host_case(quick)}
