"""ssd (SPEC; Mamba-2) through the shared chunk kernels (chunk.py): linear attention with q = C, k = B,
v = d x and log-decay d A, d the processed dt (float32, in the kernels); the state [P, N] is the [N, P]
linear-attention state read and written through swapped strides; D skip and silu(z) gate fused."""
from __future__ import annotations

from . import chunk, states


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
        initial_state=None, output_final_state=False, state_indices=None, has_initial_state=None, cu_seqlens=None,
        out=None):
    _, h, pd = x.shape
    nd = B.shape[2]
    y = out if out is not None else x.new_empty(x.shape)
    p = chunk.plan(x, cu_seqlens)
    st = states.route(initial_state, state_indices, has_initial_state, output_final_state, p.nseq, (h, pd, nd),
                      x.device, swap=True)
    extras = chunk.Ssd(dt, A, dt_bias, dt_softplus, dt_limit, D, z)
    hbuf, _ = chunk.state_pass(p, B, x, None, st, h, nd, pd, ssd=extras)
    chunk.output_pass(p, C, B, x, None, hbuf, y, 1.0, ssd=extras)
    return y, st.final
