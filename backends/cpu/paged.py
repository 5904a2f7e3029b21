"""paged_attention and write_kv_cache on the CPU. Decode (one query per sequence) runs the compiled kernel
of decode.cpp, which reads each visible cache row once, without a gather. Otherwise (a block mask, chunked prefill,
or no compiled kernel: native.py) only the cache blocks a sequence can see (its window's, with one) are
gathered; chunked prefill then runs the attention core per sequence, and decode runs batches of sequences
through one flash-kernel call each."""
from __future__ import annotations

import numpy as np
import torch

from portable_attn import checks

from . import native
from .attention import Options, first_key, one_query_each, sequence
from .tiles import add_sinks, attend, bounds, clear, flash, lse_rows, store, unit, unseen
from .workspace import buffer

GATHER_BUDGET = 1 << 24  # bytes of keys and values one decode batch gathers (16 MiB: measured best)


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None):
    # This backend checks the op's index values itself (CpuBackend.checks_values): the compiled decode kernel those it
    # reads (all of a call without cu_seqlens_q), checks.py the others, where index checks are on.
    index = q, k_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k
    kernel_checks = cu_seqlens_q is None and block_mask is None
    if not kernel_checks and checks.index_checks_enabled(q):
        _check_values(*index)
    decode = cu_seqlens_q is None or one_query_each(q, cu_seqlens_q, max_seqlen_q)
    if decode and block_mask is None:  # one query per sequence, at its last position: the compiled kernel
        try:
            done = native.decode(q, k_cache, v_cache, sinks, softmax_scale, window_size[0], softcap, return_lse, out,
                                 block_table, seqused_k, None, max_seqlen_k)
        except IndexError:  # a value out of range, found before any write: checks.py's error says which
            try:
                _check_values(*index)
            except ValueError as e:
                raise e from None  # the kernel's IndexError is not the user's concern
            raise
        if done is not None:
            return done
        if kernel_checks and checks.index_checks_enabled(q):  # no compiled kernel
            _check_values(*index)
    opts = Options(causal, window_size, softcap, sinks, softmax_scale, block_mask)
    if cu_seqlens_q is None:
        plain = _plain_decode(opts, q, k_cache, v_cache, block_table, seqused_k)
        if plain is not None:
            ot, lt = plain
            if out is not None:
                ot = out.copy_(ot)
            return (ot, lt) if return_lse else ot
    o = out if out is not None else q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32) if return_lse else None
    lens = seqused_k.tolist()
    if decode:
        _decode(opts, q, k_cache, v_cache, block_table, seqused_k, lens, o, lse)
    else:
        bs = k_cache.shape[1]
        for s, (qs, qe) in enumerate(bounds(cu_seqlens_q, q.shape[0])):
            b0 = first_key(opts, qe - qs, lens[s]) // bs
            blocks = block_table[s, b0:-(-lens[s] // bs)].long()
            k, v = (c.index_select(0, blocks).flatten(0, 1)[:lens[s] - b0 * bs] for c in (k_cache, v_cache))
            sequence(opts, s, q[qs:qe], k, v, b0 * bs, lens[s], o[qs:qe], lse_rows(lse, qs, qe))
    return (o, lse) if return_lse else o


def _check_values(q, k_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    checks.paged_values(dict(q=q, k_cache=k_cache, block_table=block_table, seqused_k=seqused_k,
                             cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k))


def _plain_decode(opts, q, k_cache, v_cache, block_table, seqused_k):
    """Decode where each query sees all its sequence's keys (no binding window, mask or softcap), every
    sequence has one and the block-padded gather fits one batch: o [S, Hq, Dv] and lse [Hq, S] from one
    kernel call on token-gathered keys, or None when the call is not of this kind. A sequence's keys are
    padded with copies of its first key, masked out: no slot it does not use is read (nothing to clear).
    The index arithmetic runs in NumPy on views of the int32 tables (a torch op costs several us)."""
    nseq, (nb, bs, hkv, d), dv = q.shape[0], k_cache.shape, v_cache.shape[3]
    if not nseq or opts.block_mask is not None or opts.softcap != 0 or d != dv:
        return None
    used = seqused_k.numpy()
    lens = used.tolist()  # min / max of a short list: cheaper than NumPy's reductions
    least, most = min(lens), max(lens)
    if least == 0 or 0 <= opts.window[0] < most - 1:
        return None
    nk = -(-most // bs) * bs  # keys per sequence, block-padded
    if nseq * nk * hkv * (d + dv) * k_cache.element_size() > GATHER_BUDGET or not _flat(k_cache, v_cache):
        return None
    slots = (block_table.numpy()[:, :nk // bs, None].astype(np.int64) * bs + np.arange(bs)).reshape(nseq, nk)
    bias = None
    if least != nk:  # padding: each sequence's first key again (so no slot it does not use is read), masked out
        seen = np.arange(nk) < used[:, None]                                  # [S, nk]
        slots = np.where(seen, slots, slots[:, :1])
        bias = torch.from_numpy(np.where(seen, np.float32(0), np.float32(-np.inf))[:, None, None]).to(q.dtype)
    ids = torch.from_numpy(slots.ravel())
    kt, vt = (torch.index_select(c.view(nb * bs, hkv, -1), 0, ids, out=buffer(f"paged.{n}", (ids.shape[0], hkv, d),
              c.dtype)).view(nseq, nk, hkv, d).transpose(1, 2) for n, c in (("k", k_cache), ("v", v_cache)))
    qg = unit(q).reshape(nseq, hkv, q.shape[1] // hkv, d)  # [S, Hkv, g, D]: a kv head's g query heads as rows
    ot, lt = flash(qg, kt, vt, 0.0, False, attn_mask=bias, scale=opts.scale)
    ot, lt = add_sinks(ot.view(nseq, q.shape[1], 1, d), lt.reshape(nseq, q.shape[1], 1), opts.sinks)
    return ot.view(nseq, q.shape[1], d).to(q.dtype), lt.reshape(nseq, q.shape[1]).t().contiguous()


def _flat(*caches) -> bool:
    """Each cache [NB, BS, Hkv, D] views as [NB * BS, Hkv, D] (blocks one after the other)."""
    return all(c.stride(0) == c.shape[1] * c.stride(1) for c in caches)


def _decode(opts, q, k_cache, v_cache, block_table, seqused_k, lens, o, lse):
    """One query per sequence, at position Lk - 1: batches of sequences, keys gathered block-padded."""
    bs = k_cache.shape[1]
    first = [first_key(opts, 1, n) for n in lens]
    b0 = [f // bs for f in first]
    counts = [-(-n // bs) - b for n, b in zip(lens, b0)]
    row_bytes = bs * k_cache.shape[2] * (k_cache.shape[3] + v_cache.shape[3]) * k_cache.element_size()
    for a, b, m in _batches(counts, row_bytes):
        ids = _block_ids(block_table[a:b], b0[a:b], counts[a:b], m)
        kt, vt = (torch.index_select(c, 0, ids, out=buffer(f"paged.{n}", (ids.shape[0], *c.shape[1:]), c.dtype))
                  .view(b - a, m * bs, *c.shape[2:]) for n, c in (("k", k_cache), ("v", v_cache)))  # [C, m*BS, Hkv, D]
        vis = _visible(opts, a, seqused_k[a:b], [p * bs for p in b0[a:b]], first[a:b], lens[a:b], m * bs)
        if vis is not None:  # padding, slots past seqused_k, keys outside the window or mask
            dead = ~vis.view(b - a, -1) if opts.block_mask is None else unseen(vis, k_cache.shape[2])
            if dead is not None:
                kt, vt = clear(dead, kt, vt)
        ot, lt = attend(q[a:b, :, None], kt.transpose(1, 2), vt.transpose(1, 2), vis, opts.scale, opts.softcap)
        store(o, lse, a, ot, lt, opts.sinks)  # n = C tiles of one row


def _batches(counts: list[int], row_bytes: int) -> list[tuple[int, int, int]]:
    """(a, b, m): sequences a .. b - 1 gathered together, m blocks each, each batch grown while its
    block-padded gather fits GATHER_BUDGET."""
    batches, a = [], 0
    while a < len(counts):
        b, m = a + 1, counts[a]
        while b < len(counts) and (b + 1 - a) * max(m, counts[b]) * row_bytes <= GATHER_BUDGET:
            m = max(m, counts[b])
            b += 1
        batches.append((a, b, m))
        a = b
    return batches


def _block_ids(table, b0: list[int], counts: list[int], m: int):
    """The cache block of each (sequence, column) of a batch, flat [C * m]: table[s, b0[s] + col] for the
    sequence's `counts[s]` used columns, block 0 past them (any block in range: its keys get cleared)."""
    if not any(b0) and all(n == m for n in counts):  # every column used: the table's own entries
        return table[:, :m].flatten()
    cols = torch.arange(m)
    used = cols < torch.tensor(counts)[:, None]  # [C, m]
    where = (torch.tensor(b0)[:, None] + cols).clamp(max=table.shape[1] - 1)
    return torch.where(used, table.long().gather(1, where), 0).flatten()


def _visible(opts, a: int, used, start: list[int], first: list[int], lens: list[int], nk: int):
    """bool [C, 1|Hm, 1, nk]: which of its nk gathered keys (key i at position start[s] + i) the query of
    each sequence a + s (`used`: their seqused_k, `lens` as ints) sees; None when each sees all of them."""
    lo = [f - p for f, p in zip(first, start)]   # first and one-past-last visible gathered key
    hi = [n - p for n, p in zip(lens, start)]
    if opts.block_mask is None and not any(lo) and all(n == nk for n in hi):
        return None
    i = torch.arange(nk)
    vis = i < (torch.tensor(hi) if any(start) else used)[:, None]                  # [C, nk]
    if any(lo):
        vis &= i >= torch.tensor(lo)[:, None]
    if opts.block_mask is not None:
        j, last = torch.tensor(start)[:, None] + i, torch.tensor(lens)[:, None] - 1  # key, query positions
        vis = vis[:, None, None] & torch.stack([opts.block_mask.visible(a + s, last[s], j[s])
                                                for s in range(len(lens))])       # [C, Hm, 1, nk]
    return vis[:, None, None] if vis.dim() == 2 else vis


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0  # -1 marks padding tokens
    slots = slot_mapping[keep].long()
    where = (slots // k_cache.shape[1], slots % k_cache.shape[1])
    k_cache.index_put_(where, k[keep])  # in place, through whatever strides the cache views have
    v_cache.index_put_(where, v[keep])
    return None
