"""The gated delta rule (SPEC `gated_delta_rule`; KDA with per-key-dim g): token by token in the compiled kernel
(recurrent.cpp, which linear attention shares) where it is built, else chunked (see `chunk.delta`); the step form
likewise."""
from __future__ import annotations

import torch

from portable_attn.envs import lookup

from .chunk import delta, split, sweep
from .native import BUILT, SWITCH
from .states import emit, finish, packed, run_sequences, update_rows


def _l2norm(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale x rsqrt(sum x^2 + 1e-6) over the last axis, float32."""
    x = x.float()
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(1e-6).rsqrt_().mul_(scale)


def token_by_token(built, q, k, v, g, beta, scale, l2: bool, y, initial_state, output_final_state, state_indices,
                   has_initial_state, cu_seqlens):
    """The sequence form in the compiled kernel (recurrent.cpp: beta None is linear attention, g None no decay),
    its outputs into y; returns the op's final state."""
    cu, states = packed(q.shape[0], cu_seqlens, initial_state, state_indices, has_initial_state,
                        (v.shape[1], q.shape[2], v.shape[2]), q.device)
    built.delta_seq(q, k, v, g, beta, cu, states, scale, l2, y)
    return finish(states, initial_state, state_indices, output_final_state)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False, out=None):
    n_tok, _, kd = q.shape
    hv = v.shape[1]
    y = out if out is not None else v.new_empty(v.shape)
    built = BUILT[lookup(SWITCH)]
    if built is not None:  # recurrent.cpp, token by token: fewer flops than the chunked products without matrix units
        return y, token_by_token(built, q, k, v, g, beta, scale, use_qk_l2norm, y, initial_state, output_final_state,
                                 state_indices, has_initial_state, cu_seqlens)

    def step(a, b, c, s):
        qc, kc = split(q[a:b], c), split(k[a:b], c)
        qc, kc = (_l2norm(qc, scale), _l2norm(kc)) if use_qk_l2norm else (qc.mul_(scale), kc)
        return delta(qc, kc, split(v[a:b], c), split(g[a:b], c), split(beta[a:b], c), s)

    def kernel(start, end, s0):
        return sweep(step, y, start, end, s0)

    final = run_sequences(kernel, n_tok, (hv, kd, v.shape[2]), q.device, cu_seqlens, initial_state, state_indices,
                          has_initial_state, output_final_state)
    return y, final


def gated_delta_rule_step(q, k, v, g, beta, *, state, scale=None, state_indices=None, use_qk_l2norm=False,
                          out=None):
    built = BUILT[lookup(SWITCH)]
    o = None if built is None else built.delta_step(q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm, out)
    if o is not None:  # recurrent.cpp, one pass (None: states not each contiguous)
        return o
    hv = v.shape[1]
    q, k = (_l2norm(q), _l2norm(k)) if use_qk_l2norm else (q.float(), k.float())
    q, k = q.repeat_interleave(hv // q.shape[1], 1), k.repeat_interleave(hv // k.shape[1], 1)  # [bsz, Hv, K]
    a = g.float().exp()
    a = a[..., None, None] if a.dim() == 2 else a[..., None]

    def step(s):                                                               # [bsz, Hv, K, V], in place
        s *= a                                                                 # S' = diag(exp(g_t)) S
        kq = torch.stack([k, q], -2) @ s                                       # [bsz, Hv, 2, V]: one read of S'
        u = beta.float()[..., None] * (v.float() - kq[..., 0, :])              # beta (v - S'^T k)
        s.addcmul_(k[..., None], u[..., None, :])                              # S' + k u^T
        o = kq[..., 1, :] + (q * k).sum(-1, keepdim=True) * u                  # (S' + k u^T)^T q
        return emit(scale * o, out, v.dtype)

    return update_rows(state, state_indices, step)
