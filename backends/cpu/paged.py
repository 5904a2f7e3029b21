"""paged_attention and write_kv_cache on the CPU. Only the cache blocks a sequence can see (its window's,
with one) are gathered; chunked prefill then runs the attention core per sequence, and decode runs
batches of sequences through one kernel call each."""
from __future__ import annotations

import torch

from .attention import Options, first_key, sequence
from .tiles import attend, bounds, clear, store, unseen

GATHER_BUDGET = 1 << 24  # bytes of keys and values one decode batch gathers (16 MiB: measured best)


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None):
    o = out if out is not None else q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    opts = Options(causal, window_size, softcap, sinks, softmax_scale, block_mask)
    lens = seqused_k.tolist()
    if cu_seqlens_q is None or q.shape[0] == len(lens) and bool((cu_seqlens_q.diff() == 1).all()):  # decode
        _decode(opts, q, k_cache, v_cache, block_table, lens, o, lse)
    else:
        bs = k_cache.shape[1]
        for s, (qs, qe) in enumerate(bounds(cu_seqlens_q, q.shape[0])):
            b0 = first_key(opts, qe - qs, lens[s]) // bs
            blocks = block_table[s, b0:-(-lens[s] // bs)].long()
            k, v = (c.index_select(0, blocks).flatten(0, 1)[:lens[s] - b0 * bs] for c in (k_cache, v_cache))
            sequence(opts, s, q[qs:qe], k, v, b0 * bs, lens[s], o[qs:qe], lse[:, qs:qe])
    return (o, lse) if return_lse else o


def _decode(opts, q, k_cache, v_cache, block_table, lens, o, lse):
    """One query per sequence, at position Lk - 1: batches of sequences, keys gathered block-padded."""
    nseq, bs = len(lens), k_cache.shape[1]
    first = torch.tensor([first_key(opts, 1, n) for n in lens], dtype=torch.long)  # [S]
    b0 = first // bs
    nblocks = -(-torch.tensor(lens, dtype=torch.long) // bs) - b0
    counts = nblocks.tolist()
    row_bytes = bs * k_cache.shape[2] * (k_cache.shape[3] + v_cache.shape[3]) * k_cache.element_size()
    batches, a = [], 0
    while a < nseq:  # grow each batch while its block-padded gather fits the budget
        b, m = a + 1, counts[a]
        while b < nseq and (b + 1 - a) * max(m, counts[b]) * row_bytes <= GATHER_BUDGET:
            m = max(m, counts[b])
            b += 1
        batches.append((a, b, m))
        a = b
    # one buffer per cache for all batches: fresh pages cost more than the copy into them
    most = max([(b - a) * m for a, b, m in batches] + [0])
    bufs = [c.new_empty(most, *c.shape[1:]) for c in (k_cache, v_cache)]
    for a, b, m in batches:
        cols = torch.arange(m)
        used = cols < nblocks[a:b, None]  # [C, m]
        where = (b0[a:b, None] + cols).clamp(max=block_table.shape[1] - 1)
        ids = torch.where(used, block_table[a:b].long().gather(1, where), 0)  # unused: any block in range
        kt, vt = (torch.index_select(c, 0, ids.flatten(), out=buf[:(b - a) * m]).view(b - a, m * bs, *c.shape[2:])
                  for c, buf in zip((k_cache, v_cache), bufs))  # [C, m*BS, Hkv, D]
        j = b0[a:b, None] * bs + torch.arange(m * bs)  # [C, K] key positions
        lk = torch.tensor(lens[a:b], dtype=torch.long)[:, None]
        vis = ((j >= first[a:b, None]) & (j < lk))[:, None, None]  # [C, 1, 1, K]
        if opts.block_mask is not None:
            vis = vis & torch.stack([opts.block_mask.visible(s, lk[s - a] - 1, j[s - a])
                                     for s in range(a, b)])  # [C, Hm, 1, K]
        dead = unseen(vis, k_cache.shape[2])  # padding, slots past seqused_k, keys outside the window or mask
        if dead is not None:
            kt, vt = clear(kt, dead), clear(vt, dead)
        vis = None if bool(vis.all()) else vis
        ot, lt = attend(q[a:b, :, None], kt.transpose(1, 2), vt.transpose(1, 2), vis, opts.scale, opts.softcap)
        store(o, lse, a, ot, lt, opts.sinks)  # n = C tiles of one row


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0  # -1 marks padding tokens
    slots = slot_mapping[keep].long()
    where = (slots // k_cache.shape[1], slots % k_cache.shape[1])
    k_cache.index_put_(where, k[keep])  # in place, through whatever strides the cache views have
    v_cache.index_put_(where, v[keep])
    return None
