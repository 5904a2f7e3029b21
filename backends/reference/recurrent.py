"""The recurrent family of docs/spec.md as plain PyTorch: per sequence, a loop over tokens.

Every op is a per-token update ``state, out_t = update(state, t)`` (vectorised over heads) driven by
one helper, `_scan`, that owns the state plumbing: where each sequence's initial state comes from
(``initial_state``, a cache row ``state_indices[i]``, or zero), where its final state goes (the cache
row, in place, in the cache's dtype; or a new ``final_state``), and the outputs. A step form is its
sequence form run on one token per sequence, with ``state`` as the cache: it shares the update.

Arguments arrive checked and normalised (`portable_attn.checks`). Arithmetic runs in
`precision.compute_dtype()` (float64, or float32 when emulating a low-precision kernel), and every
matrix or outer product goes through `precision.mm`. Decays are ``exp`` of one step's log-decay, so
strong decays underflow to zero and never overflow.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .precision import compute_dtype, mm, up

# ---- state plumbing (shared by every op) ----------------------------------------------------------

Update = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _scan(update: Update, *, n_tok: int, out_tail: tuple, state_tail: tuple, cu_seqlens, initial_state,
          state_indices, has_initial_state, output_final_state: bool, final_dtype: torch.dtype, device):
    """Run `update` over every token of every sequence; return (outputs [n_tok, *out_tail], final_state).

    Sequence i covers tokens [cu[i], cu[i+1]) and starts from: ``initial_state[i]`` (no cache); the
    cache row ``initial_state[state_indices[i]]``; zero where that index is -1, where
    ``has_initial_state[i]`` is False, or where no initial state is given. Final states are written
    into the cache rows in place (rows not listed untouched); without a cache, ``final_state`` is a new
    ``[S, *state_tail]`` tensor in ``final_dtype`` when ``output_final_state``.
    """
    cdt = compute_dtype()
    cu = [0, n_tok] if cu_seqlens is None else [int(c) for c in cu_seqlens.tolist()]
    nseq = len(cu) - 1
    rows = None if state_indices is None else [int(r) for r in state_indices.tolist()]
    has = None if has_initial_state is None else [bool(h) for h in has_initial_state.tolist()]
    cache = initial_state if rows is not None else None

    final = None
    if cache is None and output_final_state:
        final = torch.empty((nseq,) + tuple(state_tail), dtype=final_dtype, device=device)

    outs = torch.empty((n_tok,) + tuple(out_tail), dtype=cdt, device=device)
    for i in range(nseq):
        # initial state of sequence i
        if cache is not None:
            row = rows[i]
            read = row >= 0 and (has is None or has[i])
            state = cache[row].to(cdt) if read else torch.zeros(state_tail, dtype=cdt, device=device)
        elif initial_state is not None:
            row = None
            state = initial_state[i].to(cdt)
        else:
            row = None
            state = torch.zeros(state_tail, dtype=cdt, device=device)
        # the recurrence, token by token
        for t in range(cu[i], cu[i + 1]):
            state, outs[t] = update(state, t)
        # final state of sequence i
        if cache is not None:
            if row >= 0:
                cache[row].copy_(state)  # in place, in the cache's dtype
        elif final is not None:
            final[i].copy_(state)

    if not output_final_state:
        final_state = None
    else:
        final_state = cache if cache is not None else final
    return outs, final_state


def _emit(y: torch.Tensor, dtype: torch.dtype, out):
    """The output in the activation dtype, written into `out` (every element) when given."""
    if out is None:
        return y.to(dtype)
    out.copy_(y)
    return out


def _step_args(x: torch.Tensor, state: torch.Tensor, state_indices) -> dict:
    """A step form as its sequence form: one token per sequence, `state` as the cache."""
    bsz = x.shape[0]
    return dict(cu_seqlens=torch.arange(bsz + 1, device=x.device), initial_state=state,
                state_indices=state_indices, has_initial_state=None, output_final_state=False)


def _expand_heads(x: torch.Tensor | None, heads: int, axis: int = 1) -> torch.Tensor | None:
    """Grouped heads: head h reads group h // (heads // groups) of `x` (groups on `axis`)."""
    if x is None or x.shape[axis] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[axis], dim=axis)


def _decay(g_t: torch.Tensor) -> torch.Tensor:
    """exp of one token's log-decay, shaped to scale a state [H, K, V]: g_t is [H] or [H, K]."""
    a = torch.exp(g_t)
    return a[:, None, None] if a.dim() == 1 else a[:, :, None]


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


# ---- linear attention -----------------------------------------------------------------------------

def _linear_attention_token(S, q, k, v, g, scale):
    """One token, all heads: S [H, K, V], q, k [H, K], v [H, V], g [H] / [H, K] / None."""
    if g is not None:
        S = _decay(g) * S                              # diag(exp(g_t)) S_{t-1}
    S = S + mm("hk,hv->hkv", k, v)                     # + k_t^T v_t
    o = scale * mm("hk,hkv->hv", q, S)                 # scale * q_t S_t
    return S, o


def _linear_attention(q, k, v, g, scale, out, **states):
    qc, kc, vc, gc = up(q), up(k), up(v), up(g)

    def update(S, t):
        return _linear_attention_token(S, qc[t], kc[t], vc[t], None if gc is None else gc[t], scale)

    H, K, V = q.shape[1], q.shape[2], v.shape[2]
    y, final = _scan(update, n_tok=q.shape[0], out_tail=(H, V), state_tail=(H, K, V), device=q.device, **states)
    return _emit(y, q.dtype, out), final


def _final_dtype(initial_state, default):
    return initial_state.dtype if initial_state is not None else default


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, out=None):
    return _linear_attention(q, k, v, g, scale, out, cu_seqlens=cu_seqlens, initial_state=initial_state,
                             state_indices=state_indices, has_initial_state=has_initial_state,
                             output_final_state=output_final_state,
                             final_dtype=_final_dtype(initial_state, torch.float32))


def linear_attention_step(q, k, v, *, state, g=None, scale=None, state_indices=None, out=None):
    y, _ = _linear_attention(q, k, v, g, scale, out, final_dtype=state.dtype, **_step_args(q, state, state_indices))
    return y


# ---- gated delta rule -----------------------------------------------------------------------------

def _gated_delta_rule_token(S, q, k, v, g, beta, scale):
    """One token, all value heads: S [Hv, K, V], q, k [Hv, K] (expanded), v [Hv, V], g [Hv] / [Hv, K], beta [Hv]."""
    S = _decay(g) * S                                        # S' = diag(exp(g_t)) S_{t-1}
    u = beta[:, None] * (v - mm("hkv,hk->hv", S, k))         # u_t = beta_t (v_t - S'^T k_t)
    S = S + mm("hk,hv->hkv", k, u)                           # S_t = S' + k_t u_t^T
    o = scale * mm("hkv,hk->hv", S, q)                       # scale * S_t^T q_t
    return S, o


def _gated_delta_rule(q, k, v, g, beta, scale, use_qk_l2norm, out, **states):
    hv = v.shape[1]
    qc, kc = up(q), up(k)
    if use_qk_l2norm:
        qc, kc = _l2norm(qc), _l2norm(kc)
    qc, kc = _expand_heads(qc, hv), _expand_heads(kc, hv)
    vc, gc, bc = up(v), up(g), up(beta)

    def update(S, t):
        return _gated_delta_rule_token(S, qc[t], kc[t], vc[t], gc[t], bc[t], scale)

    K, V = q.shape[2], v.shape[2]
    y, final = _scan(update, n_tok=q.shape[0], out_tail=(hv, V), state_tail=(hv, K, V), device=q.device, **states)
    return _emit(y, q.dtype, out), final


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False, out=None):
    return _gated_delta_rule(q, k, v, g, beta, scale, use_qk_l2norm, out, cu_seqlens=cu_seqlens,
                             initial_state=initial_state, state_indices=state_indices,
                             has_initial_state=has_initial_state, output_final_state=output_final_state,
                             final_dtype=_final_dtype(initial_state, torch.float32))


def gated_delta_rule_step(q, k, v, g, beta, *, state, scale=None, state_indices=None, use_qk_l2norm=False,
                          out=None):
    y, _ = _gated_delta_rule(q, k, v, g, beta, scale, use_qk_l2norm, out, final_dtype=state.dtype,
                             **_step_args(q, state, state_indices))
    return y


# ---- SSD (Mamba-2) --------------------------------------------------------------------------------

def _ssd_token(h, x, d, A, B, C, D, z):
    """One token, all heads: h [H, P, N], x [H, P], d [H] (processed dt), A [H], B, C [H, N] (expanded),
    D [H, 1] / [H, P] / None, z [H, P] / None."""
    h = torch.exp(d * A)[:, None, None] * h + d[:, None, None] * mm("hp,hn->hpn", x, B)  # exp(d A) h + d x B^T
    y = mm("hpn,hn->hp", h, C)                                                           # h_t C_t
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z)
    return h, y


def _ssd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, out, **states):
    H, P, N = x.shape[1], x.shape[2], B.shape[2]
    d = up(dt)
    if dt_bias is not None:
        d = d + up(dt_bias)
    if dt_softplus:
        d = torch.logaddexp(d, torch.zeros_like(d))  # softplus, exact for large arguments too
    d = torch.clamp(d, min=dt_limit[0], max=dt_limit[1])
    xc, Ac, zc = up(x), up(A), up(z)
    Bc, Cc = _expand_heads(up(B), H), _expand_heads(up(C), H)
    Dc = up(D)
    if Dc is not None and Dc.dim() == 1:
        Dc = Dc[:, None]

    def update(h, t):
        return _ssd_token(h, xc[t], d[t], Ac, Bc[t], Cc[t], Dc, None if zc is None else zc[t])

    y, final = _scan(update, n_tok=x.shape[0], out_tail=(H, P), state_tail=(H, P, N), device=x.device, **states)
    return _emit(y, x.dtype, out), final


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
        initial_state=None, output_final_state=False, state_indices=None, has_initial_state=None, cu_seqlens=None,
        out=None):
    return _ssd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, out, cu_seqlens=cu_seqlens,
                initial_state=initial_state, state_indices=state_indices, has_initial_state=has_initial_state,
                output_final_state=output_final_state, final_dtype=_final_dtype(initial_state, torch.float32))


def ssd_step(x, dt, A, B, C, *, state, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), state_indices=None, out=None):
    y, _ = _ssd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, out, final_dtype=state.dtype,
                **_step_args(x, state, state_indices))
    return y


# ---- causal conv1d --------------------------------------------------------------------------------

def _causal_conv1d_token(window, x, weight, bias, silu):
    """One token, all channels: window [C, W-1] (the previous inputs, oldest first), x [C], weight [C, W]."""
    full = torch.cat([window, x[:, None]], dim=1)           # x_{t-W+1} .. x_t
    y = (weight * full).sum(dim=1)
    if bias is not None:
        y = y + bias
    if silu:
        y = F.silu(y)
    return full[:, 1:], y                                   # the last W-1 inputs


def _causal_conv1d(x, weight, bias, activation, out, **states):
    xc, wc, bc = up(x), up(weight), up(bias)
    silu = activation == "silu"

    def update(window, t):
        return _causal_conv1d_token(window, xc[t], wc, bc, silu)

    Ch, W = weight.shape
    y, final = _scan(update, n_tok=x.shape[0], out_tail=(Ch,), state_tail=(Ch, W - 1), device=x.device, **states)
    return _emit(y, x.dtype, out), final


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None, out=None):
    return _causal_conv1d(x, weight, bias, activation, out, cu_seqlens=cu_seqlens, initial_state=initial_state,
                          state_indices=state_indices, has_initial_state=has_initial_state,
                          output_final_state=output_final_state, final_dtype=_final_dtype(initial_state, x.dtype))


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None, out=None):
    y, _ = _causal_conv1d(x, weight, bias, activation, out, final_dtype=state.dtype,
                          **_step_args(x, state, state_indices))
    return y
