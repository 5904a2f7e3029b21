"""Brute-force attention in NumPy float64, independent of the reference: one query of one head at a time.

Visibility is decided key by key from SPEC's formula; a block mask is given as its element predicate
`mask_mod(s, h, p, j) -> bool` (on Python ints), never as a BlockMask.
"""
from __future__ import annotations

import math

import numpy as np


def _np(x):
    return None if x is None else np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x,
                                             dtype=np.float64)


def _pairs(cu, total):
    if cu is None:
        return [(0, total)]
    cu = [int(c) for c in cu]
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _one_query(qv, keys, values, visible, scale, softcap, sink):
    """o, lse of one query vector over the listed visible key indices."""
    logits = []
    for j in visible:
        s = scale * float(np.dot(qv, keys[j]))
        if softcap > 0:
            s = softcap * math.tanh(s / softcap)
        logits.append(s)
    every = logits + ([sink] if sink is not None else [])
    finite = [x for x in every if x != -math.inf]
    if not finite:
        return np.zeros(values.shape[-1]), -math.inf
    m = max(finite)
    z = sum(math.exp(x - m) for x in finite)
    o = np.zeros(values.shape[-1])
    for j, s in zip(visible, logits):
        o += math.exp(s - m) * values[j]
    return o / z, m + math.log(z)


def attention(q, k, v, *, cu_q=None, cu_k=None, causal=False, window=(-1, -1), softcap=0.0, sinks=None,
              scale=None, mask_mod=None, visible_fn=None):
    """o [Tq, Hq, Dv], lse [Hq, Tq] as float64 arrays.

    `mask_mod(s, h, p, j)` restricts visibility (a block mask: queries at negative positions see nothing);
    `visible_fn(s, h, t, p, j)` replaces the causal/window/mask rule entirely (sparse attention).
    """
    q, k, v, sinks = _np(q), _np(k), _np(v), _np(sinks)
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    left, right = window
    o = np.zeros((tq, hq, dv))
    lse = np.full((hq, tq), -math.inf)
    for s, ((qs, qe), (ks, ke)) in enumerate(zip(_pairs(cu_q, tq), _pairs(cu_k, k.shape[0]))):
        lq, lk = qe - qs, ke - ks
        for h in range(hq):
            g = h // (hq // hkv)
            for t in range(lq):
                p = t + lk - lq
                vis = []
                for j in range(lk):
                    if visible_fn is not None:
                        ok = visible_fn(s, h, t, p, j)
                    else:
                        ok = ((not causal or j <= p) and (left < 0 or j >= p - left)
                              and (right < 0 or j <= p + right))
                        if mask_mod is not None:
                            ok = ok and p >= 0 and bool(mask_mod(s, h, p, j))
                    if ok:
                        vis.append(j)
                sink = None if sinks is None else float(sinks[h])
                o[qs + t, h], lse[h, qs + t] = _one_query(q[qs + t, h], k[ks:ke, g], v[ks:ke, g], vis, scale,
                                                          softcap, sink)
    return o, lse


def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_q=None, **kw):
    """Gathers each sequence's keys slot by slot, then `attention` on the packed result."""
    kc, vc = _np(k_cache), _np(v_cache)
    bs = kc.shape[1]
    keys, values, cu_k = [], [], [0]
    for i in range(len(seqused_k)):
        for j in range(int(seqused_k[i])):
            b = int(block_table[i][j // bs])
            keys.append(kc[b, j % bs])
            values.append(vc[b, j % bs])
        cu_k.append(len(keys))
    k = np.array(keys).reshape(-1, kc.shape[2], kc.shape[3])
    v = np.array(values).reshape(-1, vc.shape[2], vc.shape[3])
    if cu_q is None:
        cu_q = list(range(len(seqused_k) + 1))
    return attention(q, k, v, cu_q=cu_q, cu_k=cu_k, **kw)


def sparse_attention(q, k, v, indices, *, cu_q=None, cu_k=None, **kw):
    """The visible set of query t, kv head g is the set of positions listed in indices[t, g]."""
    idx = np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices)
    starts = [qs for qs, _ in _pairs(cu_q, idx.shape[0])]
    group = q.shape[1] // k.shape[1]

    def visible(s, h, t, p, j):
        return j in set(int(x) for x in idx[starts[s] + t, h // group] if x >= 0)
    return attention(q, k, v, cu_q=cu_q, cu_k=cu_k, visible_fn=visible, **kw)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """New (k_cache, v_cache) arrays after writing token t into slot slot_mapping[t]."""
    kc, vc = _np(k_cache).copy(), _np(v_cache).copy()
    k, v = _np(k), _np(v)
    bs = kc.shape[1]
    for t, slot in enumerate(int(x) for x in slot_mapping):
        if slot >= 0:
            kc[slot // bs, slot % bs] = k[t]
            vc[slot // bs, slot % bs] = v[t]
    return kc, vc
