"""Peers: what a user would run instead of portable_attn, on the same inputs.

Each `prepare` maps our packed, token-major layout to the peer's outside the timed region and returns
the timed call. `Impl.what` says exactly what that call does.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

import portable_attn

from .fla_peers import FLA_PEERS
from .impls import Impl, Refused

HF_MAMBA2_CHUNK = 256  # Mamba2Config.chunk_size's default


def heads_first(x):
    return x.transpose(0, 1).unsqueeze(0).contiguous()  # [T, H, D] -> [1, H, T, D]


def _attention_layout(args):
    q, k, v = (heads_first(args[n]) for n in "qkv")
    return q, k, v, dict(enable_gqa=q.shape[1] != k.shape[1])


def _mask_mod(args, sizes=None):
    """The visible (query, key) pairs of a prefill attention call (Tq == Tk) as a FlexAttention mask_mod;
    evaluated on index grids it is also the dense mask."""
    causal, (left, right) = args["causal"], args["window_size"]
    if sizes is not None and "G" in sizes:  # the block_mask case's local + global pattern
        return _local_global_mod(sizes["W"], sizes["G"])

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx if causal else kv_idx >= 0
        if left >= 0:
            keep = keep & (q_idx - kv_idx <= left)
        if right >= 0:
            keep = keep & (kv_idx - q_idx <= right)
        return keep
    return mask_mod


def _local_global_mod(window: int, globals_: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= window) | (q_idx < globals_) | (kv_idx < globals_)
    return mask_mod


def _softcap_mod(cap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod


def _cpu_without(*names, **override):
    """The cpu backend on the same call, `names` left out and `override` set: the work a feature adds."""
    def prepare(args, sizes):
        kept = {k: v for k, v in args.items() if k not in names} | override
        return functools.partial(portable_attn.attention, **kept, backend="cpu")
    return prepare


def _cpu_band(args, sizes):
    """The block_mask case's local band alone as a window, no block mask (the globals' work left out)."""
    return _cpu_without("block_mask", window_size=(sizes["W"], sizes["W"]))(args, sizes)


def _sdpa_causal(args, sizes):
    q, k, v, gqa = _attention_layout(args)
    return functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, **gqa)


def _sdpa_mask(args, sizes):
    q, k, v, gqa = _attention_layout(args)
    idx = torch.arange(q.shape[2], device=q.device)
    mask = _mask_mod(args)(None, None, idx[:, None], idx[None, :])  # [T, T] bool
    return functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, **gqa)


def _dense_mask_bytes(sizes):
    """The bool mask, one more while building it, and the float copy SDPA makes of it; plus q, k, v, out."""
    T = sizes["T"]
    return T * T * (1 + 1 + 4) + 4 * T * sizes["H"] * sizes["D"] * 4


EAGER_BLOCK_MASK_PAIRS = 4096 * 4096  # eager create_block_mask holds ~11 bytes per (query, key) pair


@functools.cache
def _flex_fns():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compile per shape and pattern: a run has more than dynamo's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Above EAGER_BLOCK_MASK_PAIRS the block mask is built compiled, which never materialises [T, T].
    return create_block_mask, torch.compile(create_block_mask), torch.compile(flex_attention, dynamic=False)


def _flex(args, sizes):
    try:
        eager_block_mask, compiled_block_mask, flex = _flex_fns()
    except ImportError:
        raise Refused("skipped", f"FlexAttention is not in torch {torch.__version__}") from None
    q, k, v, gqa = _attention_layout(args)
    Tq, Tk = q.shape[2], k.shape[2]
    block_mask_of = eager_block_mask if Tq * Tk <= EAGER_BLOCK_MASK_PAIRS else compiled_block_mask
    block_mask = block_mask_of(_mask_mod(args, sizes), None, None, Tq, Tk, device=q.device)
    score_mod = _softcap_mod(args["softcap"]) if args.get("softcap") else None
    return functools.partial(flex, q, k, v, score_mod=score_mod, block_mask=block_mask, **gqa)


def _flash_attn(args, sizes):
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        raise Refused("skipped", f"flash-attn is not installed ({exc})") from None
    q, k, v = (args[n].unsqueeze(0) for n in "qkv")  # [1, T, H, D]: its layout, a view of ours
    return functools.partial(flash_attn_func, q, k, v, causal=args["causal"], window_size=args["window_size"])


def _gather_sdpa(args, sizes):
    q, k_cache, v_cache, table = args["q"].unsqueeze(2), args["k_cache"], args["v_cache"], args["block_table"]
    if not bool((args["seqused_k"] == table.shape[1] * k_cache.shape[1]).all()):
        raise Refused("skipped", "gather+SDPA here needs every sequence to fill its block table (no padding mask)")

    def step():
        k = k_cache[table].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D], gathered out of the pages
        v = v_cache[table].flatten(1, 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return step


def _hf(module: str, *names: str):
    """The PyTorch function of a transformers model module, under the first of `names` it has (names moved
    across versions); the torch path, not a kernel-hub wrapper."""
    try:
        importlib.import_module("transformers").logging.set_verbosity_error()  # its "slow fallback" notices
        found = importlib.import_module(f"transformers.models.{module}")
    except ImportError as exc:
        raise Refused("skipped", f"transformers with {module} is not installed ({exc})") from None
    fn = next((f for f in (getattr(found, n, None) for n in names) if f is not None), None)
    if fn is None:
        raise Refused("skipped", f"this transformers has no {' / '.join(names)} in {module}")
    return getattr(fn, "__wrapped__", fn)


def _hf_qwen3next(args, sizes):
    fn = _hf("qwen3_next.modeling_qwen3_next", "torch_chunk_gated_delta_rule")
    q, k, v, g, beta = (args[n].unsqueeze(0) for n in ("q", "k", "v", "g", "beta"))  # [1, T, H, ...], their layout
    return functools.partial(fn, q, k, v, g, beta, use_qk_l2norm_in_kernel=args["use_qk_l2norm"])


def _hf_qwen3next_step(args, sizes):
    fn = _hf("qwen3_next.modeling_qwen3_next", "torch_recurrent_gated_delta_rule")
    rep = args["v"].shape[1] // args["q"].shape[1]  # GQA heads repeated in setup: not every version does it
    q, k = (args[n].repeat_interleave(rep, dim=1).unsqueeze(1) for n in "qk")  # [B, 1, Hv, K]
    v, g, beta = (args[n].unsqueeze(1) for n in ("v", "g", "beta"))
    return functools.partial(fn, q, k, v, g, beta, initial_state=args["state"], output_final_state=True,
                             use_qk_l2norm_in_kernel=args["use_qk_l2norm"])


def _torch_conv1d(args, sizes):
    x, w = args["x"].t().unsqueeze(0).contiguous(), args["weight"]  # [1, C, T], as the modules hold it

    def conv():
        y = F.conv1d(x, w.unsqueeze(1), args["bias"], padding=w.shape[1] - 1, groups=w.shape[0])[..., :x.shape[2]]
        return F.silu(y) if args["activation"] == "silu" else y
    return conv


def _hf_conv_step(args, sizes):
    fn = _hf("qwen3_next.modeling_qwen3_next", "torch_causal_conv1d_update", "causal_conv1d_update")
    return functools.partial(fn, args["x"].unsqueeze(-1), args["state"], args["weight"], args["bias"],
                             args["activation"])


def _hf_mamba2(args, sizes):
    fn = _hf("mamba2.modeling_mamba2", "mamba2_chunk_scan")
    x, dt, B, C = (args[n].unsqueeze(0) for n in ("x", "dt", "B", "C"))
    return functools.partial(fn, x, dt, args["A"], B, C, chunk_size=HF_MAMBA2_CHUNK, D=args["D"],
                             dt_bias=args["dt_bias"], dt_softplus=args["dt_softplus"])


PEERS = {p.name: p for p in (
    Impl("sdpa-causal", "peer", "F.scaled_dot_product_attention(q, k, v, is_causal=True) on [1, H, T, D] copies",
         _sdpa_causal),
    Impl("sdpa-mask", "peer", "F.scaled_dot_product_attention(q, k, v, attn_mask=dense bool [T, T] mask) on "
         "[1, H, T, D] copies, in a worker process; the mask is built in setup", _sdpa_mask,
         need_bytes=_dense_mask_bytes, in_child=True),
    Impl("flex", "peer", "torch.compile(flex_attention)(q, k, v, block_mask) on [1, H, T, D] copies (softcap: a tanh "
         "score_mod); the block mask (create_block_mask, same mask_mod) and the compile are setup", _flex),
    Impl("cpu-no-softcap", "peer", "portable_attn.attention(..., backend='cpu') on the same call without softcap: "
         "what the softcap adds", _cpu_without("softcap")),
    Impl("cpu-band", "peer", "portable_attn.attention(..., backend='cpu') with the mask's band as window_size=(W, W) "
         "and no block mask: the local blocks' work without the globals or the mask", _cpu_band),
    Impl("flash-attn", "peer", "flash_attn.flash_attn_func(q, k, v, causal, window_size) on [1, T, H, D] views "
         "(GPU only; skipped where flash-attn is not installed)", _flash_attn),
    Impl("gather-sdpa", "peer", "k_cache[block_table], v_cache[block_table] gathered to [B, Hkv, L, D] (timed), "
         "then F.scaled_dot_product_attention(enable_gqa=True)", _gather_sdpa),
    Impl("hf-qwen3next", "peer", "transformers Qwen3-Next torch_chunk_gated_delta_rule(use_qk_l2norm_in_kernel=True, "
         "chunk 64) on [1, T, H, K] views; the whole call (its transposes, fp32 casts, padding) is timed",
         _hf_qwen3next),
    Impl("hf-mamba2", "peer", f"transformers Mamba-2 mamba2_chunk_scan torch path (chunk {HF_MAMBA2_CHUNK}): "
         "softplus(dt + dt_bias), chunked SSD scan, D skip; no z, as in Mamba2Mixer (z goes to its norm)", _hf_mamba2),
    Impl("hf-qwen3next-step", "peer", "transformers Qwen3-Next torch_recurrent_gated_delta_rule on B one-token "
         "sequences [B, 1, H, K] (q, k heads repeated to Hv in setup), the state cache as initial_state, the new "
         "float32 state returned", _hf_qwen3next_step),
    Impl("torch-conv1d", "peer", "F.conv1d(groups=C, padding=W-1) + silu on a [1, C, T] copy, as nn.Conv1d in "
         "the transformers torch paths", _torch_conv1d),
    Impl("hf-conv-step", "peer", "transformers Qwen3-Next torch causal_conv1d_update: cat(state, x), F.conv1d, "
         "state shifted in place", _hf_conv_step),
    *FLA_PEERS,
)}
