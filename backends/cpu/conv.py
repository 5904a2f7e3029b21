"""Causal depthwise conv1d (SPEC `causal_conv1d`): by the compiled kernel (conv.cpp: each output row from its
input rows where they lie, written once) where it is built, else every sequence at once in one token-major
buffer, each sequence preceded by its W-1 state rows, convolved as W shifted multiply-adds over whole rows (the
layout of the caller's tokens: no transposes, which cost more than the products here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from portable_attn.envs import lookup

from .native import BUILT, SWITCH
from .states import emit, finish, initial_states, update_rows


def _act(y, bias, activation):
    """act(y + bias) in place for a fresh y [*, C], float32 (fresh buffers cost page faults)."""
    if bias is not None:
        y.add_(bias.float())
    return F.silu(y, inplace=True) if activation == "silu" else y


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None, out=None):
    n_tok, ch = x.shape
    w = weight.shape[1] - 1                                                  # state width W-1
    cu = torch.tensor([0, n_tok], device=x.device) if cu_seqlens is None else cu_seqlens.long()
    nseq = cu.shape[0] - 1
    states = initial_states(initial_state, state_indices, has_initial_state, nseq, (ch, w), x.device)
    built = BUILT[lookup(SWITCH)]
    if built is not None and x.stride(1) == 1:
        y = out if out is not None and out.stride(1) == 1 else x.new_empty(x.shape)
        finals = states.new_empty(nseq, w, ch)                               # [S, W-1, C]
        built.conv_seq(x, weight, bias, states.transpose(1, 2).to(x.dtype).contiguous(), cu.contiguous(),
                       activation == "silu", y, finals)
        y = y if out is None or y is out else out.copy_(y)
        return y, finish(finals.transpose(1, 2), initial_state, state_indices, output_final_state, x.dtype)
    # rows of the buffer: sequence i is its W-1 state rows then its tokens, so it starts at cu[i] + i w
    seq = torch.arange(nseq, device=x.device)
    lens = cu[1:] - cu[:-1]
    tok = torch.arange(n_tok, device=x.device) + torch.repeat_interleave(seq + 1, lens, output_size=n_tok) * w
    win = (cu[:-1] + seq * w)[:, None] + torch.arange(w, device=x.device)   # [S, W-1] each sequence's state rows
    rows = x.new_empty((n_tok + nseq * w, ch), dtype=torch.float32)
    rows.index_copy_(0, tok, x.float())
    rows.index_copy_(0, win.flatten(), states.transpose(1, 2).reshape(-1, ch))
    # y[r] is the window ending at buffer row r + w: tap j of the filter reads row r + j, in place
    taps = weight.float().T.contiguous()                                     # [W, C]
    y = rows[w:] * taps[w]
    for j in range(w):
        y.addcmul_(rows[j:j + y.shape[0]], taps[j])
    y = y if nseq == 1 else y.index_select(0, tok - w)                     # one sequence: its rows are y's
    y = emit(_act(y, bias, activation), out, x.dtype)
    # the final state: the last W-1 rows of each sequence's part of the buffer
    finals = rows.index_select(0, (win + lens[:, None]).flatten()).view(nseq, w, ch).transpose(1, 2)  # [S, C, W-1]
    return y, finish(finals, initial_state, state_indices, output_final_state, x.dtype)


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None, out=None):
    built = BUILT[lookup(SWITCH)]
    o = None if built is None else built.conv_step(x, weight, bias, state, state_indices, activation == "silu", out)
    if o is not None:  # conv.cpp (None: a state dtype other than x's)
        return o

    def step(s):                                                             # [bsz, C, W-1], in place
        window = torch.cat([s, x.float()[..., None]], dim=-1)               # [bsz, C, W]
        s.copy_(window[..., 1:])
        return emit(_act((window * weight.float()).sum(-1), bias, activation), out, x.dtype)

    return update_rows(state, state_indices, step)
