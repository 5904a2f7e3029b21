"""Run Hugging Face transformers (>= 5) models through portable_attn.

- `register(backend=None)` registers the attention function and its mask function under the name
  "portable_attn": a model loaded or set with `attn_implementation="portable_attn"` runs every attention
  layer through `portable_attn.attention` (padding packed into varlen sequences, causal, sliding windows,
  softcap, sinks, GQA, scaling; the varlen kwargs `cu_seq_lens_q/k` when transformers passes them).
- `patch(model, backend=None)` swaps the module-level kernels the hybrid layers call (Qwen3-Next's gated
  delta rule and short conv, the Mamba-2 family's conv1d and SSD scan) for the portable_attn ops, for every
  model of those classes while the patch is active; `.undo()` or a `with` block restores them. The models'
  caches are passed as op states: recurrent states are updated in place, conv states through a view.

transformers is imported only when one of these is called. The ops are inference ops: run the model under
`torch.no_grad()` / `torch.inference_mode()`.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops, registry
from ..errors import NotSupported

NAME = "portable_attn"
log = logging.getLogger("portable_attn")

_RESOLVED: dict[tuple[str, str], str] = {}  # (op, backend spec) -> the backend of its first call
_LAST: dict[str, str] = {}  # op -> the backend of its latest call


def _run(op: str, backend, **args):
    """Call the public op, noting which backend serves it (resolved on the first call per op and spec)."""
    key = (op, repr(backend))
    if key not in _RESOLVED:
        _RESOLVED[key] = registry.select(ops.make_call(op, args), backend).name
    _LAST[op] = _RESOLVED[key]
    return getattr(ops, op)(**args, backend=backend)


def backends_used() -> dict[str, str]:
    """{op: backend} for the ops the integration has run in this process (the latest call's backend spec,
    resolved on its first call)."""
    return dict(_LAST)


def _uniform_cu(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


# ---------------------------------------------------------------------------------------------------------
# Attention


def register(backend=None) -> str:
    """Register "portable_attn" with transformers' AttentionInterface and AttentionMaskInterface; idempotent
    (a second call rebinds `backend`). Returns the name to pass as `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, functools.partial(attention_forward, backend=backend))
    # the unpadded kernels' mask: the 2D padding mask [B, keys] (None when nothing is padded), which
    # `attention_forward` packs; without a registered mask function transformers would pass None
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


def _window(sliding_window, causal: bool) -> tuple[int, int]:
    """transformers' `sliding_window=W` (keys with p - j < W) is `window_size=(W-1, 0)` (docs/spec.md)."""
    if not sliding_window:
        return (-1, -1)
    w = int(sliding_window) - 1
    return (w, 0 if causal else w)


class _Rows(NamedTuple):
    """The rows of [B, L, ...] that a [B, L] mask keeps: each batch row's kept run (b, start, end) where every
    batch row keeps one run (padding), else (batch, position) index tensors."""
    runs: list | None
    index: tuple

    @classmethod
    def of(cls, keep: np.ndarray, device) -> "_Rows":
        count, first = keep.sum(1), keep.argmax(1)
        pos = np.arange(keep.shape[1])
        if ((pos >= first[:, None]) & (pos < (first + count)[:, None]) == keep).all():
            return cls([(b, f, f + c) for b, (f, c) in enumerate(zip(first.tolist(), count.tolist()))], ())
        return cls(None, tuple(torch.from_numpy(i).to(device) for i in keep.nonzero()))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, ...] -> its kept rows, packed (slices of the runs: cheaper than indexing)."""
        return torch.cat([x[b, s:e] for b, s, e in self.runs]) if self.runs is not None else x[self.index]

    def scatter(self, out: torch.Tensor, packed: torch.Tensor) -> None:
        """The inverse of `take`: packed rows written back to their places in out [B, L, ...]."""
        if self.runs is None:
            out[self.index] = packed
            return
        start = 0
        for b, s, e in self.runs:
            out[b, s:e] = packed[start:start + e - s]
            start += e - s


class _Packing(NamedTuple):
    """Where the tokens a padding mask keeps sit, and their sequence boundaries."""
    mask: torch.Tensor               # a copy of the mask's last Lk columns, what this was computed from
    lq: int
    lk: int
    q_rows: _Rows | None             # None: every query row is kept
    k_rows: _Rows
    cu_q: torch.Tensor
    cu_k: torch.Tensor


_PACKING: list = [None]  # the latest: every attention layer of a forward passes the same mask


def _packing(attention_mask, lq: int, lk: int) -> _Packing:
    """The packing of `attention_mask` [B, >= Lk], worked out on the host once per mask content (every
    attention layer of a forward passes the same one)."""
    m, p = attention_mask[:, -lk:], _PACKING[0]
    if (p is not None and (p.lq, p.lk) == (lq, lk) and p.mask.shape == m.shape and p.mask.dtype == m.dtype
            and p.mask.device == m.device and torch.equal(p.mask, m)):
        return p
    keep_k = np.zeros((m.shape[0], lk), dtype=bool)  # a static cache: slots past the mask are unused
    keep_k[:, :m.shape[1]] = m.bool().cpu().numpy()
    keep_q = keep_k[:, lk - lq:]
    cu = torch.from_numpy(np.stack([keep_q.sum(1), keep_k.sum(1)]).cumsum(1)).to(torch.int32)
    cu = F.pad(cu, (1, 0)).to(m.device)
    p = _Packing(m.clone(), lq, lk, None if keep_q.all() else _Rows.of(keep_q, m.device), _Rows.of(keep_k, m.device),
                 cu[0], cu[1])
    _PACKING[0] = p
    return p


def _pack(q, k, v, attention_mask):
    """[B, L, H, D] tensors -> packed q, k, v, cu_seqlens_q, cu_seqlens_k and the kept query rows (None when
    every row is kept). Queries are the last Lq tokens of each key sequence (bottom-right)."""
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    if attention_mask is None:
        flat = [x.reshape(B * x.shape[1], *x.shape[2:]) for x in (q, k, v)]
        return (*flat, _uniform_cu(B, Lq, q.device), _uniform_cu(B, Lk, q.device), None)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
        raise ValueError(f"attention_mask: expected the 2D padding mask [{B}, keys] made by the {NAME!r} mask "
                         f"function, got shape {tuple(attention_mask.shape)}")
    p = _packing(attention_mask, Lq, Lk)
    packed_q = q.reshape(B * Lq, *q.shape[2:]) if p.q_rows is None else p.q_rows.take(q)
    return packed_q, p.k_rows.take(k), p.k_rows.take(v), p.cu_q, p.cu_k, p.q_rows


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, s_aux=None, is_causal=None, *, backend=None, **kwargs):
    """transformers' attention interface: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D|Dv] ->
    (attn_output [B, Lq, Hq, Dv], None). Padded query rows get zeros."""
    if dropout and module.training:
        raise NotSupported(str(backend), "attention", "attention dropout (the ops are inference ops)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, L, H, D]
    B, Lq, Hq, Dv = *q.shape[:3], v.shape[-1]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # transformers' own packed (varlen) inputs, batch 1
        if B != 1:
            raise ValueError(f"cu_seq_lens_q: packed sequences need batch 1, got query batch {B}")
        q, k, v, keep = q[0], k[0], v[0], None
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    else:
        q, k, v, cu_q, cu_k, keep = _pack(q, k, v, attention_mask)
    o = _run("attention", backend, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=bool(causal),
             window_size=_window(sliding_window, causal), softcap=float(softcap or 0.0),
             sinks=None if s_aux is None else s_aux.float(), softmax_scale=scaling)
    if keep is None:
        return o.view(B, Lq, Hq, Dv), None
    out = o.new_zeros(B, Lq, Hq, Dv)
    keep.scatter(out, o)
    return out, None


# ---------------------------------------------------------------------------------------------------------
# Hybrid layers: replacements of the models' module-level kernel functions, with their signatures


_ACTIVATIONS = (None, "silu", "swish")
_PACKING_KWARGS = ("seq_idx", "cu_seqlens", "cu_seq_lens_q")  # per-token sequence ids the ops do not take here


def _activation(name):
    return None if name is None else "silu"


def _packed_kwargs(kwargs) -> str | None:
    given = [n for n in _PACKING_KWARGS if kwargs.get(n) is not None]
    return f"packed-sequence argument {given[0]}" if given else None


def _conv_state_tail(conv_state: torch.Tensor, width: int):
    """transformers keeps `conv_kernel_size` (>= W-1) inputs; the op's state is the last W-1, a view."""
    return conv_state[..., conv_state.shape[-1] - (width - 1):]


@functools.cache
def _warn_once(name: str, reason: str) -> None:
    log.warning("portable_attn: %s runs the model's own function: %s", name, reason)


def _make_kernels(backend, original):
    """The replacement functions; `original[name]` is called for calls they do not cover (logged once)."""

    def fallback(name, reason, *args, **kwargs):
        _warn_once(name, reason)
        return original[name](*args, **kwargs)

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        # hidden_states [B, C, L] -> [B, C, L]; each batch row is one sequence from a zero state
        reason = _packed_kwargs(kwargs) or (None if activation in _ACTIVATIONS else f"activation {activation!r}")
        if reason:
            return fallback("causal_conv1d_fn", reason, hidden_states, weight, bias, activation, **kwargs)
        B, C, L = hidden_states.shape
        x = hidden_states.transpose(1, 2).reshape(B * L, C)
        y, _ = _run("causal_conv1d", backend, x=x, weight=weight, bias=bias, activation=_activation(activation),
                    cu_seqlens=_uniform_cu(B, L, x.device))
        return y.view(B, L, C).transpose(1, 2)

    def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None):
        # hidden_states [B, C, 1], conv_state [B, C, S] (S >= W-1), updated in place -> [B, C, 1]
        width, S = weight.shape[-1], conv_state.shape[-1]
        if hidden_states.shape[-1] != 1 or S < width - 1 or activation not in _ACTIVATIONS:
            return fallback("causal_conv1d_update", "not a one-token step of a supported conv", hidden_states,
                            conv_state, weight, bias, activation)
        shifted = conv_state[..., 1:S - width + 2].clone() if S > width - 1 else None  # columns the op leaves
        y = _run("causal_conv1d_step", backend, x=hidden_states[..., 0], weight=weight, bias=bias,
                 state=_conv_state_tail(conv_state, width), activation=_activation(activation))
        if shifted is not None:  # the cache as transformers leaves it: every column shifted by one
            conv_state[..., :S - width + 1] = shifted
        return y[..., None]

    def _state_args(state, batch: int, in_place: bool) -> dict:
        """initial_state for a batch of `batch` sequences: in place through state_indices when the caller
        keeps the final state in the tensor it passed (`in_place`), else read-only."""
        if state is None:
            return {}
        if in_place:
            rows = torch.arange(batch, dtype=torch.int32, device=state.device)
            return {"initial_state": state, "state_indices": rows}
        return {"initial_state": state}

    def torch_chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None,
                                     **kwargs):
        # query/key [B, L, H, K], value [B, L, Hv, V], g/beta [B, L, Hv], state [S, Hv, K, V]
        B, L, H, K = key.shape
        Hv, V = value.shape[-2:]
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"cu_seqlens: packed sequences need batch 1, got batch {B}")
        cu = _uniform_cu(B, L, key.device) if cu_seqlens is None else cu_seqlens.to(torch.int32)
        S = cu.shape[0] - 1
        in_place = output_final_state and initial_state is not None
        out, final = _run("gated_delta_rule", backend, q=query.reshape(B * L, H, K), k=key.reshape(B * L, H, K),
                          v=value.reshape(B * L, Hv, V), g=g.reshape(B * L, Hv), beta=beta.reshape(B * L, Hv),
                          output_final_state=output_final_state, cu_seqlens=cu,
                          use_qk_l2norm=use_qk_l2norm_in_kernel, **_state_args(initial_state, S, in_place))
        return out.view(B, L, Hv, V), final

    def torch_recurrent_gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
                                         use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
        if query.shape[1] != 1 or initial_state is None or cu_seqlens is not None:
            return torch_chunk_gated_delta_rule(query, key, value, g, beta, initial_state=initial_state,
                                                output_final_state=output_final_state,
                                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                                cu_seqlens=cu_seqlens)
        state = initial_state if output_final_state else initial_state.clone()
        out = _run("gated_delta_rule_step", backend, q=query[:, 0], k=key[:, 0], v=value[:, 0], g=g[:, 0],
                   beta=beta[:, 0], state=state, use_qk_l2norm=use_qk_l2norm_in_kernel)
        return out[:, None], state if output_final_state else None

    def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False, **kwargs):
        # hidden_states [b, L, H, P], dt [b, L, H], A [H], B/C [b, L, G, N], state [b, H, P, N]
        reason = _packed_kwargs(kwargs)
        if reason:
            return fallback("mamba2_chunk_scan", reason, hidden_states, dt, A, B, C, chunk_size, D=D,
                            dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus,
                            dt_limit=dt_limit, return_final_states=return_final_states, **kwargs)
        b, L, H, P = hidden_states.shape
        G, N = B.shape[-2:]
        z = kwargs.get("z")
        in_place = return_final_states and initial_states is not None
        y, final = _run("ssd", backend, x=hidden_states.reshape(b * L, H, P), dt=dt.reshape(b * L, H), A=A,
                        B=B.reshape(b * L, G, N), C=C.reshape(b * L, G, N), D=D,
                        z=None if z is None else z.reshape(b * L, H, P), dt_bias=dt_bias, dt_softplus=dt_softplus,
                        dt_limit=tuple(float(x) for x in dt_limit), output_final_state=return_final_states,
                        cu_seqlens=_uniform_cu(b, L, hidden_states.device),
                        **_state_args(initial_states, b, in_place))
        y = y.view(b, L, H, P)
        return (y, final) if return_final_states else y

    def mamba2_selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False,
                                      z=None, **kwargs):
        # state [b, H, P, N] (in place), hidden_states [b, H, P]; dt [b, H, P], A [H, P, N], dt_bias [H, P]
        # arrive expanded along P (and N), as mamba's kernel takes them: the op takes them per head
        tied = dt.stride(-1) == 0 and A.stride(-1) == A.stride(-2) == 0 and (dt_bias is None or dt_bias.stride(-1) == 0)
        if not tied or kwargs.get("state_batch_indices") is not None:
            return fallback("mamba2_selective_state_update", "dt/A/dt_bias not shared along the head dim", state,
                            hidden_states, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus, z=z, **kwargs)
        return _run("ssd_step", backend, x=hidden_states, dt=dt[..., 0], A=A[:, 0, 0], B=B, C=C, state=state, D=D,
                    z=z, dt_bias=None if dt_bias is None else dt_bias[:, 0], dt_softplus=dt_softplus,
                    dt_limit=(0.0 if dt_softplus else -math.inf, math.inf))  # the models' step clamps nothing

    return {f.__name__: f for f in (causal_conv1d_fn, causal_conv1d_update, torch_chunk_gated_delta_rule,
                                    torch_recurrent_gated_delta_rule, mamba2_chunk_scan,
                                    mamba2_selective_state_update)}


# the parameters each replaced function must start with (a model whose function differs is left alone)
_SIGNATURES = {
    "causal_conv1d_fn": ("hidden_states", "weight", "bias", "activation"),
    "causal_conv1d_update": ("hidden_states", "conv_state", "weight", "bias", "activation"),
    "torch_chunk_gated_delta_rule": ("query", "key", "value", "g", "beta", "chunk_size", "initial_state",
                                     "output_final_state", "use_qk_l2norm_in_kernel"),
    "torch_recurrent_gated_delta_rule": ("query", "key", "value", "g", "beta", "initial_state",
                                         "output_final_state", "use_qk_l2norm_in_kernel"),
    "mamba2_chunk_scan": ("hidden_states", "dt", "A", "B", "C", "chunk_size", "D", "dt_bias", "initial_states",
                          "dt_softplus", "dt_limit", "return_final_states"),
    "mamba2_selective_state_update": ("state", "hidden_states", "dt", "A", "B", "C", "D", "dt_bias",
                                      "dt_softplus", "z"),
}


def _matches(fn, name: str) -> bool:
    if isinstance(fn, torch.nn.Module):  # transformers >= 5.25 wraps them in a hub-kernel module: its forward
        fn = fn.forward
    params = tuple(inspect.signature(inspect.unwrap(fn)).parameters)
    return params[:len(_SIGNATURES[name])] == _SIGNATURES[name]


class Patch:
    """The kernels of some modeling modules replaced by portable_attn ops; `undo()` (or leaving a `with`
    block) puts the originals back. `replaced` lists "module.function" names."""

    def __init__(self, modules, backend=None):
        self._saved: list[tuple[object, str, object]] = []
        self._attention = None  # (model, its attn_implementation before) when patch() switched it
        for module in modules:
            names = [n for n in _SIGNATURES if n in vars(module)]
            if not names:
                continue
            current = {n: getattr(module, n) for n in names}
            if any(getattr(f, "_portable_attn", False) for f in current.values()):
                raise RuntimeError(f"{module.__name__} is already patched by portable_attn: undo that patch first")
            kernels = _make_kernels(backend, current)
            for n in names:
                if not _matches(current[n], n):
                    log.warning("portable_attn: %s.%s has an unexpected signature; not replaced", module.__name__, n)
                    continue
                kernels[n]._portable_attn = True
                self._saved.append((module, n, current[n]))
                setattr(module, n, kernels[n])
        self.replaced = [f"{m.__name__}.{n}" for m, n, _ in self._saved]

    def undo(self) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()
        if self._attention is not None:
            model, before = self._attention
            model.set_attn_implementation(before)
            self._attention = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def patch(model, backend=None, attention: bool = True) -> Patch:
    """Route `model`'s layers through portable_attn: the hybrid layers' kernels (module-level functions of
    its modeling modules, so every model of those classes while active) and, with `attention`, its
    attention (`register(backend)` then `model.set_attn_implementation("portable_attn")`, restored by undo).
    Returns the `Patch`; use it as a context manager or call `.undo()`."""
    modules = {type(m).__module__ for m in model.modules()}
    handle = Patch([sys.modules[name] for name in sorted(modules) if name.startswith("transformers.models.")],
                   backend)
    if attention:
        handle._attention = (model, model.config._attn_implementation)
        model.set_attn_implementation(register(backend))
    return handle
