"""Mamba-2 SSD (SPEC `ssd`): linear attention with q = C, k = B, v = d x, log-decay d A (state [P, N]
is the transposed linear-attention state [N, P]); token by token in the compiled kernel (recurrent.cpp) where it
is built, else chunked (see `chunk.linear`); the step form likewise."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from portable_attn.envs import lookup

from .chunk import linear, split, sweep
from .native import BUILT, SWITCH
from .states import emit, finish, packed, run_sequences, update_rows


def _dt(dt, dt_bias, dt_softplus, dt_limit):
    """d = clamp(f(dt + dt_bias), dt_limit), float32."""
    d = dt.float()
    if dt_bias is not None:
        d = d + dt_bias.float()
    if dt_softplus:
        d = torch.logaddexp(d, torch.zeros_like(d))
    return d.clamp(min=dt_limit[0], max=dt_limit[1])


def _skip_gate(y, x, D, z):
    """y + D x, times silu(z) when given; float32. D is shaped to broadcast against x."""
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z.float())
    return y


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
        initial_state=None, output_final_state=False, state_indices=None, has_initial_state=None, cu_seqlens=None,
        out=None):
    n_tok, h, p = x.shape
    y = out if out is not None else x.new_empty(x.shape)
    built = BUILT[lookup(SWITCH)]
    if built is not None:  # recurrent.cpp, token by token (the chunked products are slower without matrix units)
        cu, states = packed(n_tok, cu_seqlens, initial_state, state_indices, has_initial_state, (h, p, B.shape[2]),
                            x.device)
        built.ssd_seq(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit[0], dt_limit[1], cu, states, y)
        return y, finish(states, initial_state, state_indices, output_final_state)
    d = _dt(dt, dt_bias, dt_softplus, dt_limit)                     # [T, H]
    dA = d * A.float()                                              # log-decays
    Dc = None if D is None else D.float().view(h, 1, -1)            # [H, 1, 1|P] against [NC, H, C, P]

    def step(a, b, c, s):
        xc, dc = split(x[a:b], c), split(d[a:b], c)                 # [NC, H, C, P], [NC, H, C]
        o, s = linear(split(C[a:b], c), split(B[a:b], c), xc * dc[..., None], split(dA[a:b], c), s)
        return _skip_gate(o, xc, Dc, None if z is None else split(z[a:b], c)), s

    def kernel(start, end, s0):
        return sweep(step, y, start, end, s0.transpose(-1, -2)).transpose(-1, -2)

    final = run_sequences(kernel, n_tok, (h, p, B.shape[2]), x.device, cu_seqlens, initial_state, state_indices,
                          has_initial_state, output_final_state)
    return y, final


def ssd_step(x, dt, A, B, C, *, state, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), state_indices=None, out=None):
    built = BUILT[lookup(SWITCH)]
    o = None if built is None else built.ssd_step(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit[0],
                                                   dt_limit[1], state, state_indices, out)
    if o is not None:  # recurrent.cpp, one pass (None: states not each contiguous)
        return o
    h = x.shape[1]
    d = _dt(dt, dt_bias, dt_softplus, dt_limit)                                   # [bsz, H]
    Bh, Ch = (t.float().repeat_interleave(h // t.shape[1], 1) for t in (B, C))    # [bsz, H, N]
    Dc = None if D is None else D.float().view(h, -1)                             # [H, 1|P]

    def step(s):                                                                  # [bsz, H, P, N], in place
        s *= (d * A.float()).exp()[..., None, None]                               # exp(d A) h
        s.addcmul_((d[..., None] * x.float())[..., None], Bh[..., None, :])       # + d x B^T
        y = (Ch[..., None, :] @ s.transpose(-1, -2)).squeeze(-2)                  # h C as C^T h^T: 2x faster
        return emit(_skip_gate(y, x.float(), Dc, z), out, x.dtype)

    return update_rows(state, state_indices, step)
