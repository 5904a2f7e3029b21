"""Causal depthwise conv1d (SPEC `causal_conv1d`): one `F.conv1d` pass over every sequence at once,
each sequence preceded by its W-1 state columns."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .states import emit, finish, initial_states, update_rows


def _act(y, bias, activation):
    """act(y + bias) for y [*, C], float32."""
    if bias is not None:
        y = y + bias.float()
    return F.silu(y) if activation == "silu" else y


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None, out=None):
    n_tok, ch = x.shape
    w = weight.shape[1] - 1                                                  # state width W-1
    cu = torch.tensor([0, n_tok], device=x.device) if cu_seqlens is None else cu_seqlens.long()
    nseq = cu.shape[0] - 1
    states = initial_states(initial_state, state_indices, has_initial_state, nseq, (ch, w), x.device)
    # columns of the joint row: sequence i is its W-1 state columns then its tokens, so it starts at cu[i] + i w
    seq = torch.arange(nseq, device=x.device)
    first = cu[:-1] + seq * w                                                # [S] where each sequence's state starts
    tok = torch.arange(n_tok, device=x.device) + torch.repeat_interleave(seq + 1, cu[1:] - cu[:-1]) * w
    win = first[:, None] + torch.arange(w, device=x.device)                  # [S, W-1]
    row = x.new_empty((ch, n_tok + nseq * w), dtype=torch.float32)
    row[:, tok] = x.float().T
    row[:, win.flatten()] = states.transpose(0, 1).reshape(ch, -1)
    # output column j is the window ending at row column j + w (no tokens: nothing to convolve)
    full = F.conv1d(row[None], weight.float()[:, None], groups=ch)[0] if n_tok else row
    y = emit(_act(full[:, tok - w].T, bias, activation), out, x.dtype)
    # the final state: the last W-1 columns of each sequence's part of the row
    finals = row[:, win + (cu[1:] - cu[:-1])[:, None]].permute(1, 0, 2)      # [S, C, W-1]
    return y, finish(finals, initial_state, state_indices, output_final_state, x.dtype)


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None, out=None):
    def step(s):                                                             # [bsz, C, W-1], in place
        window = torch.cat([s, x.float()[..., None]], dim=-1)               # [bsz, C, W]
        s.copy_(window[..., 1:])
        return emit(_act((window * weight.float()).sum(-1), bias, activation), out, x.dtype)

    return update_rows(state, state_indices, step)
