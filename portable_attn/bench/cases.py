"""Benchmark cases: one op in one pattern, its sizes per point, and the FLOPs (and bytes) of the visible work.

FLOPs count a multiply-add as two and only the work the op's contract asks for: attention counts
`QK^T` and `PV` over the visible (query, key) pairs; the recurrences count the token-by-token update
(`gdr`: decay, `S^T k`, the rank-1 update and `S^T q`, 7·K·V per token and value head; `ssd`: decay,
`dt·x B^T` and `h C`, 5·P·N per token and head), whatever a chunked algorithm does on top.
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
    x: int  # the value on the case's series axis


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    op: str                       # the portable_attn op
    pattern: str
    axis: str                     # the size `Point.x` is ("T", "ctx")
    baseline: str                 # the implementation the ratios are against
    peers: tuple[str, ...]
    points: tuple[Point, ...]
    make: Callable[[dict, str], dict]          # (sizes, device) -> the op's arguments
    flops: Callable[[dict], float]
    bytes: Callable[[dict], float] | None = None  # decode: what one step must read and write

    def label(self, point: Point) -> str:
        return f"{self.axis}={point.x}"


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _dtype(sizes: dict) -> torch.dtype:
    return DTYPES[sizes.get("dtype", "fp32")]


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
    return dict(q=q, k=k, v=v, causal=True, window_size=(left, 0 if left >= 0 else -1))


def _attention_flops(sizes: dict) -> float:
    left = sizes["W"] - 1 if "W" in sizes else -1
    return 4.0 * sizes["H"] * sizes["D"] * _visible_pairs(sizes["T"], left)


def _decode_inputs(sizes: dict, device: str) -> dict:
    B, ctx, BS = sizes["B"], sizes["ctx"], sizes["BS"]
    gen = torch.Generator().manual_seed(0)
    per_seq = ctx // BS
    k_cache, v_cache = (_randn(gen, B * per_seq, BS, sizes["Hkv"], sizes["D"]).to(device, _dtype(sizes))
                        for _ in range(2))
    table = torch.randperm(B * per_seq, generator=gen).view(B, per_seq).to(torch.int32)  # pages out of order
    return dict(q=_randn(gen, B, sizes["Hq"], sizes["D"]).to(device, _dtype(sizes)), k_cache=k_cache, v_cache=v_cache,
                block_table=table.to(device), seqused_k=torch.full((B,), ctx, dtype=torch.int32, device=device),
                max_seqlen_k=ctx)


def _decode_flops(sizes: dict) -> float:
    return 4.0 * sizes["B"] * sizes["Hq"] * sizes["D"] * sizes["ctx"]


def _decode_bytes(sizes: dict) -> float:
    kv = 2 * sizes["B"] * sizes["ctx"] * sizes["Hkv"] * sizes["D"]
    q_and_out = 2 * sizes["B"] * sizes["Hq"] * sizes["D"]
    return _dtype(sizes).itemsize * (kv + q_and_out) + 4 * sizes["B"] * (sizes["ctx"] // sizes["BS"] + 1)  # + block table, lengths


def _gdr_inputs(sizes: dict, device: str) -> dict:
    T, H, K, V = sizes["T"], sizes["H"], sizes["K"], sizes["V"]
    gen = torch.Generator().manual_seed(0)
    args = dict(q=_randn(gen, T, H, K), k=_randn(gen, T, H, K), v=_randn(gen, T, H, V),
                g=F.logsigmoid(_randn(gen, T, H)), beta=torch.sigmoid(_randn(gen, T, H)))
    return {n: t.to(device) for n, t in args.items()} | dict(use_qk_l2norm=True)


def _gdr_flops(sizes: dict) -> float:
    return 7.0 * sizes["T"] * sizes["H"] * sizes["K"] * sizes["V"]


def _ssd_inputs(sizes: dict, device: str) -> dict:
    T, H, P, N, G = sizes["T"], sizes["H"], sizes["P"], sizes["N"], sizes["G"]
    gen = torch.Generator().manual_seed(0)
    uniform = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*shape, generator=gen)  # noqa: E731
    args = dict(x=_randn(gen, T, H, P), dt=0.5 * _randn(gen, T, H), A=-uniform(1.0, 16.0, H),  # Mamba-2's init ranges
                B=_randn(gen, T, G, N), C=_randn(gen, T, G, N), D=_randn(gen, H),
                dt_bias=torch.log(torch.expm1(uniform(1e-3, 0.1, H))))
    return {n: t.to(device) for n, t in args.items()} | dict(dt_softplus=True)


def _ssd_flops(sizes: dict) -> float:
    return 5.0 * sizes["T"] * sizes["H"] * sizes["P"] * sizes["N"]


def gpu_catalogue() -> dict[str, Case]:
    """The GPU goals of the triton backend (bf16; on an H100): prefill as fast as SDPA, a 1k window at 32k
    far cheaper than the same kernel's dense causal run, decode near the memory bandwidth."""
    def series(axis, values, **fixed):
        return tuple(Point({axis: v} | fixed, v) for v in values)

    cases = (
        Case("gpu_causal", "attention", "dense causal prefill, GQA 32/8, bf16", "T", "sdpa-causal",
             ("sdpa-causal", "flex", "flash-attn"), series("T", (8192,), H=32, Hkv=8, D=128, dtype="bf16"),
             _attention_inputs, _attention_flops),
        Case("gpu_swa", "attention", "causal with a window W at T=32768 (W=T: dense), GQA 32/8, bf16", "W",
             "flex", ("flex", "flash-attn"), series("W", (1024, 32768), T=32768, H=32, Hkv=8, D=128, dtype="bf16"),
             _attention_inputs, _attention_flops),
        Case("gpu_decode_b64", "paged_attention", "paged decode step, batch 64, GQA 32/8, bf16", "ctx",
             "gather-sdpa", ("gather-sdpa",), series("ctx", (8192,), B=64, Hq=32, Hkv=8, D=128, BS=16, dtype="bf16"),
             _decode_inputs, _decode_flops, _decode_bytes),
    )
    return {c.name: c for c in cases}


def catalogue(quick: bool = False) -> dict[str, Case]:
    """Every case by name; `quick` shrinks every size to seconds-long runs for tests and CI. The GPU cases
    (`gpu_catalogue`) run only when named with --case."""
    def series(axis, values, **fixed):
        return tuple(Point({axis: v} | fixed, v) for v in values)

    if quick:
        swa = series("T", (128, 256), H=2, D=16, W=32)
        causal = series("T", (128,), H=2, D=16)
        decode = series("ctx", (64, 256), B=2, Hq=4, Hkv=2, D=16, BS=16)
        decode_b64 = series("ctx", (128,), B=4, Hq=4, Hkv=2, D=16, BS=16)
        gdr = series("T", (128,), H=2, K=16, V=16)
        ssd = series("T", (128,), H=2, P=8, N=16, G=1)
    else:
        swa = series("T", (4096, 16384, 65536), H=8, D=64, W=1024)
        causal = series("T", (4096, 8192), H=8, D=64)
        decode = series("ctx", (1024, 4096, 16384, 65536), B=8, Hq=32, Hkv=8, D=128, BS=16)
        decode_b64 = series("ctx", (8192,), B=64, Hq=32, Hkv=8, D=128, BS=16)
        gdr = series("T", (4096,), H=16, K=128, V=128)
        ssd = series("T", (4096,), H=32, P=64, N=128, G=1)  # H=64 takes 3x longer in the HF peer here
    cases = (
        Case("swa", "attention", "sliding window W, causal, window_size=(W-1, 0), fp32", "T", "flex",
             ("sdpa-mask", "flex"), swa, _attention_inputs, _attention_flops),
        Case("causal", "attention", "dense causal, fp32", "T", "sdpa-causal", ("sdpa-causal", "flex"), causal,
             _attention_inputs, _attention_flops),
        Case("decode", "paged_attention", "paged decode step, one query per sequence, GQA, fp32", "ctx",
             "gather-sdpa", ("gather-sdpa",), decode, _decode_inputs, _decode_flops, _decode_bytes),
        Case("decode_b64", "paged_attention", "paged decode step, batch 64, GQA, fp32", "ctx", "gather-sdpa",
             ("gather-sdpa",), decode_b64, _decode_inputs, _decode_flops, _decode_bytes),
        Case("gdr", "gated_delta_rule", "gated delta rule prefill, use_qk_l2norm, fp32", "T", "hf-qwen3next",
             ("hf-qwen3next",), gdr, _gdr_inputs, _gdr_flops),
        Case("ssd", "ssd", "Mamba-2 SSD prefill, dt softplus + bias, D skip, fp32", "T", "hf-mamba2",
             ("hf-mamba2",), ssd, _ssd_inputs, _ssd_flops),
    )
    return {c.name: c for c in cases}


def named(quick: bool = False) -> dict[str, Case]:
    """Every case that --case may name: the default ones and the GPU ones."""
    return catalogue(quick) | gpu_catalogue()
