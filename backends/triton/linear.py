"""linear_attention (SPEC; GLA with per-key-dim g) through the shared chunk kernels (chunk.py)."""
from __future__ import annotations

from . import chunk, states


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, out=None):
    _, h, kd = q.shape
    vd = v.shape[2]
    o = out if out is not None else q.new_empty(v.shape)
    p = chunk.plan(q, cu_seqlens)
    st = states.route(initial_state, state_indices, has_initial_state, output_final_state, p.nseq, (h, kd, vd),
                      q.device)
    hbuf, _ = chunk.state_pass(p, k, v, g, st, h, kd, vd)
    chunk.output_pass(p, q, k, v, g, hbuf, o, scale)
    return o, st.final
