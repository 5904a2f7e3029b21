"""Linear attention and GLA (SPEC `linear_attention`): token by token in the compiled kernel of the gated delta rule
without its delta term (recurrent.cpp, `delta.token_by_token`) where it is built, else chunked (see
`chunk.linear`); the step form likewise."""
from __future__ import annotations

import torch

from portable_attn.envs import lookup

from .chunk import linear, split, sweep
from .delta import token_by_token
from .native import BUILT, SWITCH
from .states import emit, run_sequences, update_rows


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, out=None):
    n_tok, h, kd = q.shape
    y = out if out is not None else q.new_empty(v.shape)
    built = BUILT[lookup(SWITCH)]
    if built is not None:
        return y, token_by_token(built, q, k, v, g, None, scale, False, y, initial_state, output_final_state,
                                 state_indices, has_initial_state, cu_seqlens)

    def step(a, b, c, s):
        gs = g[a:b] if g is not None else torch.zeros(b - a, h, device=q.device)
        return linear(split(q[a:b], c).mul_(scale), split(k[a:b], c), split(v[a:b], c), split(gs, c), s)

    def kernel(start, end, s0):
        return sweep(step, y, start, end, s0)

    final = run_sequences(kernel, n_tok, (h, kd, v.shape[2]), q.device, cu_seqlens, initial_state, state_indices,
                          has_initial_state, output_final_state)
    return y, final


def linear_attention_step(q, k, v, *, state, g=None, scale=None, state_indices=None, out=None):
    built = BUILT[lookup(SWITCH)]
    o = None if built is None else built.delta_step(q, k, v, g, None, state, state_indices, scale, False, out)
    if o is not None:  # recurrent.cpp, one pass (None: states not each contiguous)
        return o

    def step(s):                                                  # [bsz, H, K, V], in place
        if g is not None:
            a = g.float().exp()
            s *= a[..., None, None] if a.dim() == 2 else a[..., None]  # diag(exp(g_t)) S
        s.addcmul_(k.float()[..., None], v.float()[..., None, :])  # + k_t^T v_t
        return emit(scale * (q.float()[..., None, :] @ s).squeeze(-2), out, q.dtype)

    return update_rows(state, state_indices, step)
