"""Context-parallel attention over torch.distributed: the sequence axis of a packed varlen batch split over
the ranks of a process group (ContextLayout's zigzag chunks), each rank computing its own queries' outputs.

Exchange: one all-to-all (`all_to_all_single`, NCCL or gloo) carrying to each rank exactly the key/value
tokens its queries can see and other ranks hold: the causal band, narrowed by a window to `left` positions
before each chunk, or the key blocks a block mask leaves non-empty. Per rank it moves O(window) tokens under
a sliding window and O(sequence) without one: the same volume as a ring's W-1 steps for full causal
attention, less whenever a window or mask hides keys (a ring moves every block past every rank), and one
collective instead of W-1 latency-bound steps. Received tokens are placed at their positions in a key
buffer per chunk (slots no query sees are zero and never read).

Compute, causal without a block mask: the diagonal part (each chunk over its own keys) runs while the
exchange is in flight; then each chunk's queries over the keys before the chunk; the two are merged with
`merge_attention_states`, which adds the sinks once. Any backend that returns lse serves. Causal with a
block mask, and non-causal attention: one call per chunk group over the assembled key range, after the
exchange. Non-causal attention with a block mask is refused (a chunk's key range would shift the mask's
query blocks).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.distributed as dist

from .. import ops
from ..masks import EMPTY, BlockMask
from .layout import Chunk, ContextLayout


@dataclasses.dataclass(frozen=True)
class Need:
    """The keys one chunk's queries see outside the chunk: positions [k0, k1) of its sequence (a buffer of
    that many slots), of which `visible` (sorted positions) are filled; `shift` aligns the call's positions."""
    chunk: Chunk
    k0: int
    k1: int
    visible: np.ndarray
    window: tuple[int, int]   # the window of the local call over the buffer


def _mask_blocks(mask: BlockMask, c: Chunk) -> np.ndarray:
    """Key blocks (of the mask's bk) non-empty for any query block of chunk `c`, any head."""
    bq, _ = mask.block_size
    lay = mask.layout[c.seq if mask.layout.shape[0] > 1 else 0]            # [H|1, nqb, nkb]
    rows = lay[:, c.start // bq:-(-c.end // bq)]
    return np.flatnonzero((rows != EMPTY).any(0).any(0).cpu().numpy())


def plan(layout: ContextLayout, *, causal: bool, window_size=(-1, -1), block_mask: BlockMask | None = None,
         merged: bool | None = None) -> list[list[Need]]:
    """Per rank, per local chunk: the keys it needs. `merged` (default: causal without a mask) plans the
    diagonal + before-the-chunk split, where the buffer ends at the chunk's start."""
    left, right = window_size
    merged = causal and block_mask is None if merged is None else merged
    out = []
    for chunks in layout.chunks:
        needs = []
        for c in chunks:
            length = layout.cu_seqlens[c.seq + 1] - layout.cu_seqlens[c.seq]
            lo = max(0, c.start - left) if left >= 0 else 0
            if causal:
                k1 = c.start if merged else c.end
                hi = k1
            else:
                k1 = min(length, c.end + right) if right >= 0 else length
                hi = k1
            if block_mask is not None:
                bk = block_mask.block_size[1]
                blocks = _mask_blocks(block_mask, c)
                pos = (blocks[:, None] * bk + np.arange(bk)[None]).ravel()
                visible = pos[(pos >= lo) & (pos < hi)]
                g = math.lcm(*block_mask.block_size)
                k0 = min(int(visible[0]) // g * g if visible.size else c.start, c.start)
            else:
                k0 = min(lo, k1)
                visible = np.arange(k0, hi)
            shift = k1 - c.end                                             # non-causal: keys past the chunk
            win = (left + shift if left >= 0 else -1, right - shift if right >= 0 else -1)
            needs.append(Need(c, k0, k1, visible, win))
        out.append(needs)
    return out


def received_tokens(layout: ContextLayout, needs: list[list[Need]]) -> list[int]:
    """Per rank, the key/value tokens it receives from other ranks under `needs` (plan's result)."""
    got = []
    for r, rank_needs in enumerate(needs):
        n = 0
        for need in rank_needs:
            owner = layout.owners[need.chunk.seq][0]
            n += int((owner[need.visible] != r).sum())
        got.append(n)
    return got


def _routes(layout: ContextLayout, needs, me: int):
    """(send rows per destination, receive counts per source, and for my buffers: the source row of each
    filled slot in cat([my kv, received kv]) and the slot in the concatenated buffers)."""
    send = []
    for dest, dest_needs in enumerate(needs):
        rows = []
        for need in dest_needs:
            owner, row = layout.owners[need.chunk.seq]
            sel = need.visible[owner[need.visible] == me] if dest != me else need.visible[:0]
            rows.append(row[sel])
        send.append(np.concatenate(rows) if rows else np.zeros(0, np.int64))
    # what each source sends me, in its order (destination me, my chunks in order, positions ascending)
    mine = needs[me]
    local_n = layout.tokens(me)
    recv_counts, order = [], {}
    base = local_n
    for src in range(layout.world):
        count = 0
        for i, need in enumerate(mine):
            owner = layout.owners[need.chunk.seq][0]
            sel = need.visible[owner[need.visible] == src] if src != me else need.visible[:0]
            order[(src, i)] = (base + count, sel)
            count += len(sel)
        recv_counts.append(count)
        base += count
    src_rows, slots, offset = [], [], 0
    for i, need in enumerate(mine):
        owner, row = layout.owners[need.chunk.seq]
        vis = need.visible
        local = vis[owner[vis] == me]
        src_rows.append(row[local])
        slots.append(offset + local - need.k0)
        for src in range(layout.world):
            if src != me:
                start, sel = order[(src, i)]
                src_rows.append(np.arange(start, start + len(sel)))
                slots.append(offset + sel - need.k0)
        offset += need.k1 - need.k0
    cat = lambda xs: torch.from_numpy(np.concatenate(xs) if xs else np.zeros(0, np.int64)).long()  # noqa: E731
    return [torch.from_numpy(s).long() for s in send], recv_counts, cat(src_rows), cat(slots), offset


def _exchange(kv: torch.Tensor, send: list, recv_counts: list, group):
    """Start the all-to-all of kv rows; (work handle, receive buffer)."""
    out = kv.new_empty((sum(recv_counts),) + tuple(kv.shape[1:]))
    inp = torch.cat([kv[s.to(kv.device)] for s in send]) if send else kv[:0]
    work = dist.all_to_all_single(out, inp.contiguous(), recv_counts, [len(s) for s in send], group=group,
                                  async_op=True)
    return work, out


def context_attention(q, k, v, layout: ContextLayout, *, causal=False, window_size=(-1, -1), softcap=0.0,
                      sinks=None, softmax_scale=None, block_mask=None, return_lse=False, backend=None, group=None):
    """`attention` of a packed batch whose sequence axis is split over the ranks of `group` by `layout`.

    Args:
        q [Tl, Hq, D], k [Tl, Hkv, D], v [Tl, Hkv, Dv]: this rank's tokens, in `layout.rows(rank)` order
            (`layout.shard(x, rank)` of the global packed tensors).
        layout: the ContextLayout of the batch over the group's ranks (align it to lcm of a block mask's
            block sizes).
        causal, window_size, softcap, sinks, softmax_scale, block_mask, backend: as `attention`, over the
            global sequences (block masks need causal=True).
        return_lse: also return lse [Hq, Tl] (float32).
        group: the process group (default: the world).

    Returns:
        `o [Tl, Hq, Dv]` (and `lse`) for this rank's queries: `layout.unshard` of every rank's part equals
        `attention` of the global batch.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world != layout.world:
        raise ValueError(f"layout: built for {layout.world} ranks, the group has {world}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3 or x.shape[0] != layout.tokens(rank):
            raise ValueError(f"{name}: expected [{layout.tokens(rank)}, heads, dim] (rank {rank}'s tokens of the "
                             f"layout), got shape {tuple(x.shape)}")
    if block_mask is not None:
        if not causal:
            raise ValueError("block_mask: context-parallel attention takes block masks with causal=True only (a "
                             "non-causal chunk's key range would shift the mask's query blocks)")
        g = math.lcm(*block_mask.block_size)
        if layout.align % g:
            raise ValueError(f"layout: chunk boundaries must be multiples of the block mask's blocks; build it with "
                             f"align={g} (lcm of {block_mask.block_size}), got align={layout.align}")
        block_mask.check_for(nseq=len(layout.cu_seqlens) - 1, heads=q.shape[1],
                             max_len=max(b - a for a, b in zip(layout.cu_seqlens, layout.cu_seqlens[1:])),
                             device=q.device)
    merged = causal and block_mask is None
    needs = plan(layout, causal=causal, window_size=tuple(window_size), block_mask=block_mask, merged=merged)
    send, recv_counts, src_rows, slots, buf_len = _routes(layout, needs, rank)
    d = k.shape[2]
    kv = torch.cat([k, v], dim=2)                                          # one exchange for both
    work, received = _exchange(kv, send, recv_counts, group)
    cu = layout.local_cu_seqlens(rank, q.device)
    opts = dict(softcap=softcap, softmax_scale=softmax_scale, backend=backend)
    if merged:  # the diagonal while the exchange runs
        o_diag, lse_diag = ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                         window_size=tuple(window_size), return_lse=True, **opts)
    work.wait()
    buf = kv.new_zeros((buf_len,) + tuple(kv.shape[1:]))
    buf[slots.to(q.device)] = torch.cat([kv, received])[src_rows.to(q.device)]
    kb, vb = buf[..., :d], buf[..., d:]
    mine = needs[rank]
    buf_cu = np.cumsum([0] + [n.k1 - n.k0 for n in mine])
    if merged:
        o_rem, lse_rem = _before_chunks(q, kb, vb, mine, buf_cu, window_size[0], opts)
        return ops.merge_attention_states(o_diag, lse_diag, o_rem, lse_rem, sinks=sinks, return_lse=return_lse,
                                          backend=backend)
    return _over_ranges(q, kb, vb, mine, buf_cu, causal, block_mask, sinks, return_lse, opts)


def _before_chunks(q, kb, vb, needs, buf_cu, left: int, opts):
    """Each chunk's queries over the keys before the chunk, (o [Tl, Hq, Dv], lse [Hq, Tl]); rows no key
    reaches get lse -inf (their o is never read by the merge). With a window only the first `left` queries
    of a chunk reach back; every chunk gets E query rows (padded at the end), which makes the call's window
    the same for all: a query's distance to a key is the call's plus E."""
    tl, hq = q.shape[:2]
    lens = [min(n.chunk.length, left) if left >= 0 else n.chunk.length for n in needs]
    e = max(lens, default=0)
    o = q.new_empty((tl, hq, vb.shape[2]))
    lse = torch.full((hq, tl), -math.inf, dtype=torch.float32, device=q.device)
    if e == 0 or kb.shape[0] == 0:
        return o, lse
    rows = np.concatenate([np.arange(n.chunk.row, n.chunk.row + m) for n, m in zip(needs, lens)])
    dest = np.concatenate([i * e + np.arange(m) for i, m in enumerate(lens)])
    rows_t, dest_t = torch.from_numpy(rows).to(q.device), torch.from_numpy(dest).to(q.device)
    qp = q.new_zeros((len(needs) * e,) + tuple(q.shape[1:]))
    qp[dest_t] = q[rows_t]
    cu_q = torch.arange(0, len(needs) * e + 1, e, dtype=torch.int32, device=q.device)
    cu_k = torch.tensor(buf_cu, dtype=torch.int32, device=q.device)
    op, lp = ops.attention(qp, kb, vb, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=False,
                           window_size=(left - e if left >= 0 else -1, -1), return_lse=True, **opts)
    o[rows_t] = op[dest_t]
    lse[:, rows_t] = lp[:, dest_t]
    return o, lse


def _chunk_mask(mask: BlockMask, needs) -> BlockMask:
    """The block mask of a local call whose sequence i is chunk i's key range [k0, k1): each chunk's rows of
    the mask, shifted by k0 (a multiple of both block sizes), stacked and padded with empty blocks."""
    bq, bk = mask.block_size
    parts = []
    for n in needs:
        s = n.chunk.seq if mask.layout.shape[0] > 1 else 0
        parts.append((mask.layout[s, :, n.k0 // bq:], mask.partial_index[s, :, n.k0 // bq:], n.k0 // bk))
    nqb = max((p[0].shape[1] for p in parts), default=0)
    nkb = max((p[0].shape[2] - kb0 for p in parts for kb0 in [p[2]]), default=0)
    layout = torch.zeros((len(needs), mask.layout.shape[1], nqb, max(nkb, 0)), dtype=torch.int8,
                         device=mask.layout.device)
    index = torch.full(layout.shape, -1, dtype=torch.int32, device=mask.layout.device)
    for i, (lay, idx, kb0) in enumerate(parts):
        layout[i, :, :lay.shape[1], :lay.shape[2] - kb0] = lay[:, :, kb0:]
        index[i, :, :idx.shape[1], :idx.shape[2] - kb0] = idx[:, :, kb0:]
    return BlockMask(mask.block_size, layout, index, mask.partial_masks)


def _over_ranges(q, kb, vb, needs, buf_cu, causal, block_mask, sinks, return_lse, opts):
    """Each chunk's queries over its whole key range, one call per distinct window (the shifted windows of
    non-causal chunks near a sequence's end differ)."""
    tl, hq = q.shape[:2]
    o = q.new_empty((tl, hq, vb.shape[2]))
    lse = torch.empty((hq, tl), dtype=torch.float32, device=q.device)
    for win in dict.fromkeys(n.window for n in needs):
        group = [i for i, n in enumerate(needs) if n.window == win]
        sub = [needs[i] for i in group]
        rows = torch.from_numpy(np.concatenate(
            [np.arange(n.chunk.row, n.chunk.row + n.chunk.length) for n in sub])).to(q.device)
        keys = torch.from_numpy(np.concatenate([np.arange(buf_cu[i], buf_cu[i + 1]) for i in group])).to(q.device)
        cu_q = torch.tensor(np.cumsum([0] + [n.chunk.length for n in sub]), dtype=torch.int32, device=q.device)
        cu_k = torch.tensor(np.cumsum([0] + [n.k1 - n.k0 for n in sub]), dtype=torch.int32, device=q.device)
        mask = _chunk_mask(block_mask, sub) if block_mask is not None else None
        og, lg = ops.attention(q[rows], kb[keys], vb[keys], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal,
                               window_size=win, sinks=sinks, block_mask=mask, return_lse=True, **opts)
        o[rows], lse[:, rows] = og, lg
    return (o, lse) if return_lse else o
