"""gated_delta_rule (SPEC; Gated DeltaNet with grouped value heads, KDA with per-key-dim g) through the
shared chunk kernels (chunk.py): the WY form per chunk (`_delta_wy`), the state pass with v_new = u - w S_0,
then the output kernel on v_new. With use_qk_l2norm, q and k are normalised first (float32 math, one kernel)."""
from __future__ import annotations

from . import chunk


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False, out=None):
    _, hv, vd = v.shape
    kd = q.shape[2]
    o = out if out is not None else v.new_empty(v.shape)
    if use_qk_l2norm:
        q, k = chunk.l2norm(q), chunk.l2norm(k)
    p = chunk.plan(q, cu_seqlens)
    st = chunk.states(initial_state, state_indices, has_initial_state, output_final_state, p.nseq, (hv, kd, vd),
                      q.device)
    w, u = chunk.wy_pass(p, k, v, g, beta)
    hbuf, vnew = chunk.state_pass(p, k, v, g, st, hv, kd, vd, wu=(w, u))
    chunk.output_pass(p, q, k, vnew, g, hbuf, o, scale)
    return o, st.final
