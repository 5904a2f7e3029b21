"""The case catalogue: every op over shapes, GQA ratios, head dims, ragged batches, windows, sinks,
softcap, block masks, top-k sets, paged caches and state caches, in two tiers.

A case draws its inputs in NumPy float64 from a seeded generator; `tensors.to_torch` turns them into
each backend's arrays. A case may carry an invariant of docs/spec.md: a second formulation (`variant`)
that must agree with the direct call.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from ..masks import BlockMask
from ..optable import OPS

SMOKE, FULL = "smoke", "full"
TIERS = (SMOKE, FULL)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    name: str
    make: Callable[[np.random.Generator], dict]
    tiers: tuple = TIERS
    variant: Callable | None = None       # (run, inputs) -> outputs by name; run(op, **kwargs)
    invariant: str = ""
    deterministic: bool = False
    state_in_act_dtype: bool = False      # state caches in the activation dtype instead of float32
    layout: str | None = None             # every tensor as a strided view inside garbage (tensors.LAYOUTS)
    poison: bool = False                  # NaN in the memory no output may depend on (invisible.py)
    use_out: bool = True                  # pass a NaN-filled out= (else the op allocates its output)
    heads_major: bool = False             # paged caches stored [NB, Hkv, BS, D], passed as transposed views


def strided(case: Case, layout: str = "gaps", tiers=TIERS) -> Case:
    """The same case with every tensor argument a strided view inside garbage (no invariant: one call)."""
    return dataclasses.replace(case, name=f"{case.name}+{layout}", layout=layout, tiers=tiers, variant=None,
                               invariant="", deterministic=False)


def poisoned(case: Case, tiers=TIERS) -> Case:
    """The same case with NaN in every key, cache slot and state row no output may depend on."""
    return dataclasses.replace(case, name=f"{case.name}+poison", poison=True, tiers=tiers, variant=None,
                               invariant="", deterministic=False)


def without_lse(case: Case, tiers=TIERS) -> Case:
    """The same call without `return_lse`: the routes whose kernels return no log-sum-exp (SDPA on a GPU,
    IPEX) are proven by these (no invariant: the variants read lse)."""
    make = case.make
    return dataclasses.replace(case, name=f"{case.name}+no_lse", make=lambda rng: make(rng) | {"return_lse": False},
                               tiers=tiers, variant=None, invariant="")


def catalogue(tier: str = SMOKE, ops=None) -> list[Case]:
    return [c for c in _CASES if tier in c.tiers and (ops is None or c.op in ops)]


# ---- drawing helpers --------------------------------------------------------------------------

def _cu(lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _normal(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def _packed(lens):
    return (sum(lens), list(lens)) if isinstance(lens, (list, tuple)) else (lens, None)


# ---- attention --------------------------------------------------------------------------------

def attention_case(name, lq, lk=None, *, hq=4, hkv=2, d=32, dv=None, causal=True, window=(-1, -1), softcap=0.0,
                   sinks=False, scale=None, mask=None, tiers=TIERS, variant=None, invariant="",
                   deterministic=False, qscale=1.0):
    """`lq`/`lk`: an int (one sequence, no cu_seqlens) or a list of lengths (packed varlen)."""
    lk = lq if lk is None else lk

    def make(rng):
        tq, qlens = _packed(lq)
        tk, klens = _packed(lk)
        inp = {"q": _normal(rng, tq, hq, d, scale=qscale), "k": _normal(rng, tk, hkv, d),
               "v": _normal(rng, tk, hkv, dv or d), "causal": causal, "window_size": window, "softcap": softcap,
               "softmax_scale": scale, "return_lse": True}
        if qlens is not None:
            inp["cu_seqlens_q"], inp["cu_seqlens_k"] = _cu(qlens), _cu(klens)
        if sinks:
            inp["sinks"] = _normal(rng, hq)
        if mask is not None:
            inp["block_mask"] = mask(max(klens) if klens else tk, len(klens) if klens else 1)
        return inp

    return Case("attention", name, make, tiers, variant, invariant, deterministic)


def _split(x, cu):
    return [x[int(a):int(b)] for a, b in zip(cu[:-1], cu[1:])]


def attention_one_by_one(run, inp):
    """Packed varlen == each sequence alone."""
    cq, ck = inp.pop("cu_seqlens_q"), inp.pop("cu_seqlens_k")
    outs, lses = [], []
    for q, k, v in zip(_split(inp["q"], cq), _split(inp["k"], ck), _split(inp["v"], ck)):
        got = run("attention", **(inp | {"q": q, "k": k, "v": v}))
        outs.append(got["out"])
        lses.append(got["lse"])
    return {"out": torch.cat(outs), "lse": torch.cat(lses, dim=1)}


def attention_repeat_kv(run, inp):
    """GQA == the same call with kv heads repeated."""
    rep = inp["q"].shape[1] // inp["k"].shape[1]
    return run("attention", **(inp | {"k": inp["k"].repeat_interleave(rep, 1),
                                      "v": inp["v"].repeat_interleave(rep, 1)}))


def attention_all_full_mask(run, inp):
    """A block mask whose blocks are all full == no mask."""
    lk = inp["k"].shape[0]
    layout = torch.full((1, 1, -(-lk // 16), -(-lk // 32)), 2, dtype=torch.int8)
    return run("attention", **(inp | {"block_mask": BlockMask.from_layout(layout, (16, 32)).to(inp["q"].device)}))


def attention_no_window(run, inp):
    """A window wider than the sequence == no window."""
    return run("attention", **(inp | {"window_size": (-1, -1)}))


def _mask_mod_case(name, pred, lq, **kw):
    """A mask_mod-built block mask (16x16 blocks, partial ones included) == its element mask (1x1 blocks)."""
    def variant(run, inp):
        fine = BlockMask.from_mask_mod(pred, inp["k"].shape[0], (1, 1)).to(inp["q"].device)
        return run("attention", **(inp | {"block_mask": fine}))

    return attention_case(name, lq, mask=lambda lmax, s: BlockMask.from_mask_mod(pred, lmax, (16, 16)),
                          variant=variant, invariant="mask_mod block mask == dense element mask", **kw)


def _random_layout(seed, nseq, heads, block=(16, 16)):
    """Per-sequence, per-head random layout with empty, partial and full blocks."""
    def build(lmax, s):
        rng = np.random.default_rng(seed)
        nqb, nkb = -(-lmax // block[0]), -(-lmax // block[1])
        layout = torch.from_numpy(rng.integers(0, 3, size=(nseq, heads, nqb, nkb))).to(torch.int8)
        masks = torch.from_numpy(rng.random((3,) + block) < 0.5)
        index = torch.where(layout == 1, torch.from_numpy(rng.integers(0, 3, size=layout.shape)),
                            torch.tensor(-1)).to(torch.int32)
        return BlockMask.from_layout(layout, block, index, masks)
    return build


def _with_empty_key_block(build, kb):
    """A mask builder whose key block `kb` is empty for every query and head: its keys are invisible."""
    def wrapped(lmax, s):
        m = build(lmax, s)
        layout, index = m.layout.clone(), m.partial_index.clone()
        layout[..., kb], index[..., kb] = 0, -1
        return BlockMask.from_layout(layout, m.block_size, index, m.partial_masks)
    return wrapped


def paged_case(name, lk, lq=None, *, bs=16, hq=4, hkv=2, d=32, dv=None, causal=True, window=(-1, -1),
               softcap=0.0, sinks=False, mask=None, tiers=TIERS, deterministic=False):
    """A paged cache with a shuffled block table; `lq=None` is decode (one query per sequence)."""
    def make(rng):
        nblocks = [-(-n // bs) for n in lk]
        total = sum(nblocks) + 3                      # spare blocks never referenced
        max_blocks = max(nblocks + [1]) + 1
        perm = rng.permutation(total).astype(np.int32)
        table = np.zeros((len(lk), max_blocks), dtype=np.int32)
        used = 0
        for i, n in enumerate(nblocks):
            table[i, :n] = perm[used:used + n]
            table[i, n:] = perm[-1]                   # unused entries may hold anything in range
            used += n
        tq = len(lk) if lq is None else sum(lq)
        inp = {"q": _normal(rng, tq, hq, d), "k_cache": _normal(rng, total, bs, hkv, d),
               "v_cache": _normal(rng, total, bs, hkv, dv or d), "block_table": table,
               "seqused_k": np.array(lk, dtype=np.int32), "causal": causal, "window_size": window,
               "softcap": softcap, "return_lse": True}
        if lq is not None:
            inp["cu_seqlens_q"] = _cu(lq)
        if sinks:
            inp["sinks"] = _normal(rng, hq)
        if mask is not None:
            inp["block_mask"] = mask(max(lk), len(lk))
        return inp

    return Case("paged_attention", name, make, tiers, paged_as_attention, "paged == attention on gathered keys",
                deterministic)


def paged_as_attention(run, inp):
    bs = inp["k_cache"].shape[1]
    ks, vs = [], []
    for row, n in zip(inp["block_table"].tolist(), inp["seqused_k"].tolist()):
        slots = [row[j // bs] * bs + j % bs for j in range(n)]
        ks.append(inp["k_cache"].flatten(0, 1)[slots])
        vs.append(inp["v_cache"].flatten(0, 1)[slots])
    nseq = inp["block_table"].shape[0]
    cq = inp.get("cu_seqlens_q")
    if cq is None:
        cq = torch.arange(nseq + 1, dtype=torch.int32, device=inp["q"].device)
    ck = torch.tensor([0] + np.cumsum(inp["seqused_k"].tolist()).tolist(), dtype=torch.int32,
                      device=inp["q"].device)
    args = {n: inp[n] for n in ("causal", "window_size", "softcap", "sinks", "block_mask", "return_lse")
            if n in inp}
    return run("attention", q=inp["q"], k=torch.cat(ks), v=torch.cat(vs), cu_seqlens_q=cq, cu_seqlens_k=ck, **args)


def write_then_paged(run, inp):
    """write_kv_cache into a paged cache, then paged_attention == attention."""
    bs, cq, ck = 5, inp["cu_seqlens_q"], inp["cu_seqlens_k"]
    lens = (ck[1:] - ck[:-1]).tolist()
    nblocks = [-(-n // bs) for n in lens]
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(sum(nblocks) + 2, generator=gen).to(torch.int32)
    table = torch.zeros((len(lens), max(nblocks + [1])), dtype=torch.int32)
    slots, used = [], 0
    for i, (n, nb) in enumerate(zip(lens, nblocks)):
        table[i, :nb] = perm[used:used + nb]
        used += nb
        slots += [int(table[i, j // bs]) * bs + j % bs for j in range(n)]
    k, v, dev = inp["k"], inp["v"], inp["q"].device
    kc = torch.randn((perm.numel(), bs) + tuple(k.shape[1:]), generator=gen).to(k.dtype).to(dev)
    vc = torch.randn((perm.numel(), bs) + tuple(v.shape[1:]), generator=gen).to(v.dtype).to(dev)
    run("write_kv_cache", k=k, v=v, k_cache=kc, v_cache=vc, slot_mapping=torch.tensor(slots, dtype=torch.int32,
                                                                                         device=dev))
    args = {n: inp[n] for n in ("causal", "window_size", "softcap", "sinks", "return_lse") if n in inp}
    return run("paged_attention", q=inp["q"], k_cache=kc, v_cache=vc, block_table=table.to(dev),
               seqused_k=torch.tensor(lens, dtype=torch.int32, device=dev), cu_seqlens_q=cq, **args)


def write_kv_case(name, t, *, nb=6, bs=5, hkv=2, d=16, dv=24, skip=2, heads_major=False):
    def make(rng):
        slots = rng.permutation(nb * bs)[:t].astype(np.int32)
        slots[rng.permutation(t)[:skip]] = -1
        return {"k": _normal(rng, t, hkv, d), "v": _normal(rng, t, hkv, dv),
                "k_cache": _normal(rng, nb, bs, hkv, d), "v_cache": _normal(rng, nb, bs, hkv, dv),
                "slot_mapping": slots}
    return Case("write_kv_cache", name, make, deterministic=True, heads_major=heads_major)


def sparse_case(name, lq, lk=None, *, topk=8, hq=4, hkv=2, d=32, causal_indices=False, sinks=False, softcap=0.0,
                empty_rows=0, unlisted_ends=False, tiers=TIERS, deterministic=False):
    """`unlisted_ends`: no query lists the first or last key of its sequence (where a -1 slot read as an
    index, clamped or wrapped, would land)."""
    lk = lq if lk is None else lk

    def make(rng):
        tq, qlens = _packed(lq)
        tk, klens = _packed(lk)
        qlens, klens = qlens or [tq], klens or [tk]
        idx = np.full((tq, hkv, topk), -1, dtype=np.int32)
        t = 0
        for nq, nk in zip(qlens, klens):
            for i in range(nq):
                hi = nk - nq + i + 1 if causal_indices else nk
                pool = np.array([j for j in range(max(hi, 0)) if not (unlisted_ends and j in (0, nk - 1))], np.int32)
                for h in range(hkv):
                    n = max(0, min(topk - 1, pool.size))  # at least one -1 slot
                    idx[t, h, rng.permutation(topk)[:n]] = rng.permutation(pool)[:n]
                t += 1
        idx[rng.permutation(tq)[:empty_rows]] = -1
        inp = {"q": _normal(rng, tq, hq, d), "k": _normal(rng, tk, hkv, d), "v": _normal(rng, tk, hkv, d),
               "indices": idx, "softcap": softcap, "return_lse": True}
        if isinstance(lq, list):
            inp["cu_seqlens_q"], inp["cu_seqlens_k"] = _cu(lq), _cu(lk)
        if sinks:
            inp["sinks"] = _normal(rng, hq)
        return inp

    return Case("sparse_attention", name, make, tiers, deterministic=deterministic)


# ---- merge_attention_states -------------------------------------------------------------------

def _softmax_part(q, k, v, vis):
    """Attention of q [T, H, D] over k, v [L, H, *] where vis [T, L] allows, float64: (o [T, H, Dv], lse [H, T]);
    o = 0 and lse = -inf where a query sees nothing."""
    s = np.where(vis[None], np.einsum("thd,lhd->htl", q, k) / np.sqrt(q.shape[2]), -np.inf)   # [H, T, L]
    seen = vis.any(1)[None]                                                                    # [1, T]
    m = np.where(seen, s.max(-1, initial=-np.inf), 0.0)
    w = np.exp(s - m[..., None])
    z = w.sum(-1)
    o = np.einsum("htl,lhv->thv", w / np.where(seen, z, 1.0)[..., None], v)
    return o, np.where(seen, np.log(np.where(seen, z, 1.0)) + m, -np.inf)


def merge_case(name, t, *, h=4, dv=32, empty=0.0, sinks=False, spread=3.0, split=None, tiers=TIERS,
               variant=None, invariant="", deterministic=False):
    """Two parts of `t` queries: random outputs and lse (`spread` their scale), a fraction `empty` of the
    (head, token) entries of each part -inf (both parts empty on some); or, with `split`, the causal attention
    of `t` queries over keys [0, split) and [split, t) (the queries before `split` see nothing of part b)."""
    def make(rng):
        if split is not None:
            q, k, v = _normal(rng, t, h, 16), _normal(rng, t, h, 16), _normal(rng, t, h, dv)
            vis = np.tril(np.ones((t, t), dtype=bool))
            (o_a, lse_a), (o_b, lse_b) = (_softmax_part(q, k[sl], v[sl], vis[:, sl])
                                          for sl in (slice(0, split), slice(split, t)))
        else:
            o_a, o_b = _normal(rng, t, h, dv), _normal(rng, t, h, dv)
            lse_a, lse_b = _normal(rng, h, t, scale=spread), _normal(rng, h, t, scale=spread)
            lse_a[rng.random((h, t)) < empty] = -np.inf
            lse_b[rng.random((h, t)) < empty] = -np.inf
            if empty and t:
                lse_a[:, -1] = lse_b[:, -1] = -np.inf                 # a token no part saw
        inp = {"o_a": o_a, "lse_a": lse_a, "o_b": o_b, "lse_b": lse_b, "return_lse": True}
        if sinks:
            inp["sinks"] = _normal(rng, h)
            inp["sinks"][0] = -np.inf                                 # a head without a sink
        return inp

    return Case("merge_attention_states", name, make, tiers, variant, invariant, deterministic)


def attention_split_merged(run, inp):
    """Attention over each sequence's first and last keys apart (no sinks), merged with the sinks == over all
    (non-causal: a key keeps its visibility when the split moves its position)."""
    ck = inp["cu_seqlens_k"].tolist()
    cut = [a + (b - a) // 2 for a, b in zip(ck[:-1], ck[1:])]
    parts = []
    for spans in ([(a, c) for a, c in zip(ck[:-1], cut)], [(c, b) for c, b in zip(cut, ck[1:])]):
        rows = torch.cat([torch.arange(a, b) for a, b in spans])
        lens = torch.tensor([0] + [b - a for a, b in spans]).cumsum(0).to(inp["q"].device, torch.int32)
        got = run("attention", **(inp | {"k": inp["k"][rows], "v": inp["v"][rows], "cu_seqlens_k": lens,
                                         "sinks": None, "out": None, "max_seqlen_k": None}))
        parts += [got["out"], got["lse"]]
    return run("merge_attention_states", o_a=parts[0], lse_a=parts[1], o_b=parts[2], lse_b=parts[3],
               sinks=inp.get("sinks"), return_lse=True)


def merge_swapped(run, inp):
    """Merging (b, a) == merging (a, b)."""
    return run("merge_attention_states", **(inp | {"o_a": inp["o_b"], "lse_a": inp["lse_b"], "o_b": inp["o_a"],
                                                   "lse_b": inp["lse_a"]}))


# ---- recurrent family -------------------------------------------------------------------------

TOKEN_ARGS = ("q", "k", "v", "g", "beta", "x", "dt", "B", "C", "z")


def _states(rng, inp, lens, tail, state, slots=None):
    """state: None | 'initial' (one per sequence) | 'cache' (permuted rows, a -1 and has_initial_state)."""
    nseq = len(lens)
    if state == "initial":
        inp["initial_state"] = _normal(rng, nseq, *tail, scale=0.5)
    elif state == "cache":
        slots = slots or nseq + 3
        inp["initial_state"] = _normal(rng, slots, *tail, scale=0.5)
        rows = rng.permutation(slots)[:nseq].astype(np.int32)
        if nseq > 2:
            rows[1] = -1
        inp["state_indices"] = rows
        inp["has_initial_state"] = rng.random(nseq) < 0.7
    inp["output_final_state"] = True
    if isinstance(lens, list) and len(lens) > 1 or state == "cache":
        inp["cu_seqlens"] = _cu(lens)


def recurrent_case(op, name, lens, make_tokens, tail, *, state=None, tiers=TIERS, variant=None, invariant="",
                   deterministic=False, state_in_act_dtype=False):
    """`make_tokens(rng, T)` draws the per-token and parameter inputs; `tail` is the state shape."""
    lens = lens if isinstance(lens, list) else [lens]

    def make(rng):
        inp = make_tokens(rng, sum(lens))
        _states(rng, inp, lens, tail, state)
        return inp

    return Case(op, name, make, tiers, variant, invariant, deterministic, state_in_act_dtype)


def _edge_decays(rng, g):
    """Log-decays with -inf (a state reset) on some entries and -1e4 on others (docs/spec.md)."""
    pick = rng.random(g.shape)
    return np.where(pick < 0.15, -np.inf, np.where(pick > 0.8, -1e4, g))


def linear_tokens(h, k, v, gate):
    """gate: None | 'head' | 'key' (per key dim) | 'strong' | 'edge' / 'edge_key' (-inf and -1e4 among them)."""
    def make(rng, t):
        inp = {"q": _normal(rng, t, h, k), "k": _normal(rng, t, h, k, scale=k ** -0.5), "v": _normal(rng, t, h, v)}
        if gate in ("head", "edge"):
            inp["g"] = -np.abs(_normal(rng, t, h, scale=0.3))
        elif gate in ("key", "edge_key"):
            inp["g"] = -np.abs(_normal(rng, t, h, k, scale=0.3))
        elif gate == "strong":
            inp["g"] = -20.0 - np.abs(_normal(rng, t, h))
        if gate in ("edge", "edge_key"):
            inp["g"] = _edge_decays(rng, inp["g"])
        return inp
    return make


def delta_tokens(h, hv, k, v, gate="head", l2norm=True):
    """gate: 'head' | 'key' (per key dim, KDA) | 'strong' | 'edge' / 'edge_key' (-inf and -1e4 among them)."""
    def make(rng, t):
        qk = {"q": _normal(rng, t, h, k), "k": _normal(rng, t, h, k)}
        if not l2norm:  # keep the rule contractive: unit-norm keys
            qk = {n: x / np.linalg.norm(x, axis=-1, keepdims=True) for n, x in qk.items()}
        per_key = gate in ("key", "edge_key")
        g = -np.abs(_normal(rng, t, hv, k, scale=0.2)) if per_key else -np.abs(_normal(rng, t, hv, scale=0.2))
        if gate == "strong":
            g = -20.0 - np.abs(_normal(rng, t, hv))
        if gate in ("edge", "edge_key"):
            g = _edge_decays(rng, g)
        return qk | {"v": _normal(rng, t, hv, v), "g": g, "beta": 1 / (1 + np.exp(-_normal(rng, t, hv))),
                     "use_qk_l2norm": l2norm}
    return make


def ssd_tokens(h, g, p, n, *, d_shape="head", z=True, bias=True, softplus=True, limit=(0.0, float("inf")),
               strong=False, edge=False):
    """`edge`: A = -1e4 on head 0 and dt = 30 on some tokens (d A down to -3e5), tiny dt on others."""
    def make(rng, t):
        inp = {"x": _normal(rng, t, h, p), "dt": _normal(rng, t, h, scale=0.5),
               "A": -np.exp(_normal(rng, h, scale=0.5)) * (60.0 if strong else 1.0),
               "B": _normal(rng, t, g, n), "C": _normal(rng, t, g, n), "dt_softplus": softplus, "dt_limit": limit}
        if not softplus:
            inp["dt"] = np.abs(inp["dt"])
        if edge:
            inp["A"][0] = -1e4
            pick = rng.random((t, h))
            inp["dt"] = np.where(pick < 0.3, 30.0, np.where(pick > 0.85, -30.0 if softplus else 1e-9, inp["dt"]))
        if d_shape == "head":
            inp["D"] = _normal(rng, h)
        elif d_shape == "head_p":
            inp["D"] = _normal(rng, h, p)
        if z:
            inp["z"] = _normal(rng, t, h, p)
        if bias:
            inp["dt_bias"] = _normal(rng, h, scale=0.3)
        return inp
    return make


def conv_tokens(c, w, *, bias=True, act="silu"):
    def make(rng, t):
        inp = {"x": _normal(rng, t, c), "weight": _normal(rng, c, w, scale=w ** -0.5), "activation": act}
        if bias:
            inp["bias"] = _normal(rng, c)
        return inp
    return make


def recurrent_one_by_one(op):
    """Packed varlen == each sequence alone (initial states per sequence)."""
    def variant(run, inp):
        cu = inp.pop("cu_seqlens")
        init = inp.pop("initial_state", None)
        outs, finals = [], []
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            piece = {n: (x[a:b] if n in TOKEN_ARGS and isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
            got = run(op, **piece, initial_state=None if init is None else init[i:i + 1])
            outs.append(got["out"])
            finals.append(got["final_state"])
        return {"out": torch.cat(outs), "final_state": torch.cat(finals)}
    return variant


def recurrent_stepwise(op):
    """Step forms token by token == the sequence form (one sequence, state in a cache of 3 rows)."""
    def variant(run, inp):
        init = inp.pop("initial_state")
        inp.pop("output_final_state")
        cache = torch.zeros((3,) + tuple(init.shape[1:]), dtype=init.dtype, device=init.device)
        cache[2] = init[0]
        idx = torch.tensor([2], dtype=torch.int32, device=init.device)
        outs = []
        for t in range(inp[OPS[op].primary].shape[0]):
            token = {n: (x[t:t + 1] if n in TOKEN_ARGS and isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
            outs.append(run(OPS[op].step, **token, state=cache, state_indices=idx)["out"])
        return {"out": torch.cat(outs), "final_state": cache[2:3]}
    return variant


def recurrent_split(op):
    """Each sequence split in two, the second half started from the first's state through a cache with
    permuted rows == the whole."""
    def variant(run, inp):
        cu = inp.pop("cu_seqlens").tolist()
        init = inp.pop("initial_state")
        rows = [3, 0, 4][:len(cu) - 1]
        cache = torch.zeros((5,) + tuple(init.shape[1:]), dtype=init.dtype, device=init.device)
        cache[rows] = init
        idx = torch.tensor(rows, dtype=torch.int32, device=init.device)
        halves = [(a, (a + b) // 2, b) for a, b in zip(cu[:-1], cu[1:])]
        outs = [None] * len(halves)
        for part in (0, 1):
            spans = [(h[part], h[part + 1]) for h in halves]
            sel = torch.tensor([t for a, b in spans for t in range(a, b)], dtype=torch.long, device=init.device)
            piece = {n: (x[sel] if n in TOKEN_ARGS and isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
            cu_part = torch.tensor([0] + np.cumsum([b - a for a, b in spans]).tolist(), dtype=torch.int32,
                                   device=init.device)
            got = run(op, **piece, initial_state=cache, state_indices=idx, cu_seqlens=cu_part)
            for i, (a, b) in enumerate(spans):
                o = got["out"][int(cu_part[i]):int(cu_part[i + 1])]
                outs[i] = o if part == 0 else torch.cat([outs[i], o])
        return {"out": torch.cat(outs), "final_state": cache[rows]}
    return variant


def step_case(op, name, bsz, make_tokens, tail, *, slots=None, skip=True, tiers=TIERS, deterministic=False,
              state_in_act_dtype=False):
    """One decode token for `bsz` sequences over a state cache with permuted rows (and a -1)."""
    def make(rng):
        inp = make_tokens(rng, bsz)
        nslots = slots or bsz + 3
        inp["state"] = _normal(rng, nslots, *tail, scale=0.5)
        rows = rng.permutation(nslots)[:bsz].astype(np.int32)
        if skip and bsz > 1:
            rows[0] = -1
        inp["state_indices"] = rows
        return inp
    return Case(op, name, make, tiers, deterministic=deterministic, state_in_act_dtype=state_in_act_dtype)


def _catalogue() -> list[Case]:
    la, gdr, ssd_op, conv = "linear_attention", "gated_delta_rule", "ssd", "causal_conv1d"
    chunky = [0, 1, 17, 70, 33]
    cases = [
        # attention: shapes, GQA, alignment, options
        attention_case("noncausal", 37, hq=4, hkv=4, causal=False, deterministic=True),
        attention_case("causal_gqa4_d64", 64, hq=8, hkv=2, d=64),
        attention_case("varlen_mqa", chunky, hq=4, hkv=1, variant=attention_one_by_one,
                       invariant="packed varlen == one by one"),
        attention_case("decode_alignment", [1, 1, 1], [5, 40, 1]),
        # decode as engines call it: one sequence, the op's own output
        dataclasses.replace(attention_case("decode_one_sequence", 1, 57, hq=8, hkv=2, sinks=True), use_out=False),
        dataclasses.replace(attention_case("decode_wide_window", 1, 40, dv=24, window=(60, 0), causal=False),
                            use_out=False),
        attention_case("chunked_prefill", [16, 7], [80, 7], hq=6, hkv=3),
        # a padded batch, packed: sequences of one length (a backend may run them as one batch)
        attention_case("uniform_decode", [1] * 4, [37] * 4, hq=8, hkv=2, sinks=True),
        attention_case("uniform_chunks", [5, 5], [30, 30]),
        attention_case("uniform_prefill", [24] * 3, variant=attention_one_by_one,
                       invariant="packed varlen == one by one"),
        attention_case("more_queries_than_keys", [20, 3], [8, 3]),
        attention_case("more_queries_noncausal", [12], [5], causal=False),
        attention_case("window_left", 100, window=(15, 0)),
        attention_case("window_both_noncausal", 70, causal=False, window=(8, 4)),
        attention_case("window_wider_than_seq", [40, 9], window=(500, 500), variant=attention_no_window,
                       invariant="window wider than the sequence == no window"),
        attention_case("softcap", 50, softcap=5.0, qscale=3.0),
        attention_case("sinks_varlen", [9, 30, 1], sinks=True),
        attention_case("gptoss_style", [40, 25], hq=8, hkv=2, window=(16, 0), sinks=True, softcap=20.0),
        attention_case("gqa_repeat", [30, 12], hq=6, hkv=2, sinks=True, variant=attention_repeat_kv,
                       invariant="GQA == kv heads repeated"),
        attention_case("dv_differs", 33, d=32, dv=16),
        attention_case("scale_zero", 20, scale=0.0),
        attention_case("empty", 0),
        attention_case("empty_sequences", [0, 5, 0], [0, 5, 3]),
        attention_case("head_dim_80", 24, hq=2, hkv=1, d=80),
        attention_case("head_dim_96", 24, hq=2, hkv=1, d=96),
        attention_case("head_dim_128", 140, hq=4, hkv=2, d=128, tiers=(FULL,)),
        attention_case("head_dim_256", 160, hq=2, hkv=1, d=256, tiers=(FULL,)),
        attention_case("long_causal_gqa", 1024, hq=8, hkv=2, d=64, tiers=(FULL,)),
        attention_case("long_window", 1500, hq=4, hkv=2, d=64, window=(127, 0), tiers=(FULL,)),
        attention_case("long_varlen", [300, 1, 777, 0, 512], hq=4, hkv=4, d=128, sinks=True, tiers=(FULL,)),
        # block masks
        attention_case("mask_all_full", [60, 21], variant=attention_all_full_mask,
                       invariant="all-full block mask == no mask"),
        attention_case("mask_local_global", 90, causal=False,
                       mask=lambda lmax, s: BlockMask.local_global(lmax, 8, [0, 1, 50], (16, 16))),
        attention_case("mask_strided", 96, mask=lambda lmax, s: BlockMask.strided(lmax, 11, 6, (16, 32))),
        attention_case("mask_chunked_local", 80, mask=lambda lmax, s: BlockMask.chunked_local(lmax, 24, (16, 16))),
        attention_case("mask_document", 70, causal=False,
                       mask=lambda lmax, s: BlockMask.document([0] * 20 + [1] * 35 + [2] * 15, (16, 16))),
        attention_case("mask_prefix_lm", 64, causal=False,
                       mask=lambda lmax, s: BlockMask.prefix_lm(lmax, 21, (16, 16))),
        attention_case("mask_random_per_seq_head", [40, 0, 33], hq=4, hkv=2, mask=_random_layout(3, 3, 4)),
        attention_case("mask_decode", [1, 1], [50, 23], mask=lambda lmax, s: BlockMask.strided(lmax, 7, 4, (8, 8))),
        _mask_mod_case("mask_mod_vs_element", lambda s, h, p, j: ((p * 7 + j * 3) % 5 != 0) | (j == 0), 48,
                       causal=False),
        _mask_mod_case("mask_mod_band_long", lambda s, h, p, j: (p - j).abs() < 200, 1200, hq=4, hkv=2, d=64,
                       tiers=(FULL,)),
        # paged
        paged_case("decode", [5, 33, 64, 1], hq=8, hkv=2, deterministic=True),
        paged_case("decode_odd_block", [12, 7, 30], bs=5),
        paged_case("decode_block_1", [4, 9], bs=1),
        paged_case("chunked_prefill", [20, 10], lq=[3, 10], bs=3),
        paged_case("empty_sequence", [0, 14], bs=4),
        paged_case("no_keys", [0, 0], bs=4, sinks=True),
        paged_case("window_sinks_softcap", [40, 17], bs=6, window=(9, 0), sinks=True, softcap=10.0),
        paged_case("block_mask", [40, 17], lq=[4, 17], bs=8,
                   mask=lambda lmax, s: BlockMask.strided(lmax, 5, 3, (8, 8))),
        paged_case("long_decode", [2000, 513, 1024], hq=8, hkv=1, d=128, bs=16, tiers=(FULL,)),
        paged_case("long_odd_block", [1000, 77], lq=[64, 77], bs=48, d=96, tiers=(FULL,)),
        attention_case("write_then_paged", [9, 0, 14], [20, 6, 14], variant=write_then_paged,
                       invariant="write_kv_cache then paged_attention == attention"),
        write_kv_case("write_kv_cache", 17),
        # top-k sparse
        sparse_case("topk", 40, deterministic=True),
        sparse_case("topk_varlen_causal", [12, 0, 25], topk=6, causal_indices=True),
        sparse_case("topk_decode", [1, 1], [30, 9], topk=5, causal_indices=True),
        sparse_case("topk_sinks_softcap_empty_rows", 30, sinks=True, softcap=8.0, empty_rows=3),
        sparse_case("topk_long", 1024, topk=64, hq=8, hkv=1, d=128, causal_indices=True, tiers=(FULL,)),
        # merging partial results
        attention_case("split_merged", [30, 0, 17, 9], [41, 5, 0, 22], causal=False, sinks=True,
                       variant=attention_split_merged, invariant="attention over key halves, merged == over all"),
        merge_case("plain", 40, deterministic=True),
        merge_case("causal_split", 37, h=3, dv=24, split=15, variant=merge_swapped,
                   invariant="merge(b, a) == merge(a, b)"),
        merge_case("empty_parts_sinks", 33, h=5, dv=40, empty=0.3, sinks=True),
        merge_case("far_apart", 20, h=2, dv=8, spread=60.0),
        merge_case("no_tokens", 0),
        merge_case("value_dim_1", 9, h=2, dv=1, empty=0.2),
        merge_case("wide", 300, h=8, dv=300, empty=0.1, sinks=True, tiers=(FULL,)),
    ]
    H, K, V = 2, 16, 24
    cases += [
        recurrent_case(la, "plain", 50, linear_tokens(H, K, V, None), (H, K, V), deterministic=True),
        recurrent_case(la, "decay_varlen", chunky, linear_tokens(H, K, V, "head"), (H, K, V), state="initial",
                       variant=recurrent_one_by_one(la), invariant="packed varlen == one by one"),
        recurrent_case(la, "gla_cache", [10, 0, 27, 5], linear_tokens(H, K, V, "key"), (H, K, V), state="cache"),
        recurrent_case(la, "steps", 12, linear_tokens(H, K, V, "key"), (H, K, V), state="initial",
                       variant=recurrent_stepwise(la), invariant="step forms == sequence form"),
        recurrent_case(la, "split", [30, 21], linear_tokens(H, K, V, "head"), (H, K, V), state="initial",
                       variant=recurrent_split(la), invariant="split sequence == whole"),
        recurrent_case(la, "strong_decay", 80, linear_tokens(H, K, V, "strong"), (H, K, V), state="initial"),
        recurrent_case(la, "long", [1024, 1000], linear_tokens(4, 64, 64, "key"), (4, 64, 64), state="cache",
                       tiers=(FULL,)),
        step_case("linear_attention_step", "cache", 5, linear_tokens(H, K, V, "key"), (H, K, V),
                  deterministic=True),
        step_case("linear_attention_step", "act_dtype_state", 3, linear_tokens(H, K, V, "head"), (H, K, V),
                  state_in_act_dtype=True),
        recurrent_case(gdr, "plain", 40, delta_tokens(2, 2, K, V), (2, K, V), deterministic=True),
        recurrent_case(gdr, "gqa_varlen", chunky, delta_tokens(2, 4, K, V), (4, K, V), state="initial",
                       variant=recurrent_one_by_one(gdr), invariant="packed varlen == one by one"),
        recurrent_case(gdr, "kda_cache", [10, 0, 27, 5], delta_tokens(2, 2, K, V, "key"), (2, K, V), state="cache"),
        recurrent_case(gdr, "unit_keys_no_l2norm", 30, delta_tokens(2, 2, K, V, l2norm=False), (2, K, V),
                       state="initial"),
        recurrent_case(gdr, "steps", 12, delta_tokens(1, 2, K, V), (2, K, V), state="initial",
                       variant=recurrent_stepwise(gdr), invariant="step forms == sequence form"),
        recurrent_case(gdr, "split", [30, 21], delta_tokens(2, 4, K, V), (4, K, V), state="initial",
                       variant=recurrent_split(gdr), invariant="split sequence == whole"),
        recurrent_case(gdr, "strong_decay", 80, delta_tokens(2, 2, K, V, "strong"), (2, K, V), state="initial"),
        recurrent_case(gdr, "act_dtype_cache", [9, 14], delta_tokens(2, 2, K, V), (2, K, V), state="cache",
                       state_in_act_dtype=True),
        recurrent_case(gdr, "long", [1024, 1000], delta_tokens(4, 8, 128, 128), (8, 128, 128), state="cache",
                       tiers=(FULL,)),
        step_case("gated_delta_rule_step", "cache", 5, delta_tokens(2, 4, K, V), (4, K, V), deterministic=True),
        step_case("gated_delta_rule_step", "kda", 3, delta_tokens(2, 2, K, V, "key"), (2, K, V)),
        recurrent_case(ssd_op, "plain", 45, ssd_tokens(4, 2, 8, 16), (4, 8, 16), deterministic=True),
        recurrent_case(ssd_op, "varlen", chunky, ssd_tokens(4, 1, 8, 16, d_shape="head_p"), (4, 8, 16),
                       state="initial", variant=recurrent_one_by_one(ssd_op), invariant="packed varlen == one by one"),
        recurrent_case(ssd_op, "cache_no_z_limit", [10, 0, 27, 5],
                       ssd_tokens(4, 4, 8, 16, z=False, bias=False, softplus=False, limit=(0.01, 0.5)),
                       (4, 8, 16), state="cache"),
        recurrent_case(ssd_op, "steps", 12, ssd_tokens(2, 1, 8, 16), (2, 8, 16), state="initial",
                       variant=recurrent_stepwise(ssd_op), invariant="step forms == sequence form"),
        recurrent_case(ssd_op, "split", [30, 21], ssd_tokens(4, 2, 8, 16, d_shape=None), (4, 8, 16), state="initial",
                       variant=recurrent_split(ssd_op), invariant="split sequence == whole"),
        recurrent_case(ssd_op, "strong_decay", 80, ssd_tokens(2, 1, 8, 16, strong=True), (2, 8, 16),
                       state="initial"),
        recurrent_case(ssd_op, "long", [1024, 1000], ssd_tokens(8, 1, 64, 128), (8, 64, 128), state="cache",
                       tiers=(FULL,)),
        step_case("ssd_step", "cache", 5, ssd_tokens(4, 2, 8, 16), (4, 8, 16), deterministic=True),
        step_case("ssd_step", "no_extras", 3, ssd_tokens(4, 4, 8, 16, d_shape=None, z=False, bias=False), (4, 8, 16)),
        recurrent_case(conv, "plain", 40, conv_tokens(24, 4), (24, 3), deterministic=True),
        recurrent_case(conv, "varlen_short", [0, 1, 2, 17, 9], conv_tokens(24, 4), (24, 3), state="initial",
                       variant=recurrent_one_by_one(conv), invariant="packed varlen == one by one"),
        recurrent_case(conv, "cache", [10, 0, 2, 5], conv_tokens(16, 3, bias=False, act=None), (16, 2), state="cache",
                       state_in_act_dtype=True),
        recurrent_case(conv, "width_1", [7, 3], conv_tokens(8, 1), (8, 0), state="initial"),
        recurrent_case(conv, "steps", 9, conv_tokens(16, 4), (16, 3), state="initial",
                       variant=recurrent_stepwise(conv), invariant="step forms == sequence form",
                       state_in_act_dtype=True),
        recurrent_case(conv, "split", [30, 21], conv_tokens(16, 4), (16, 3), state="initial",
                       variant=recurrent_split(conv), invariant="split sequence == whole", state_in_act_dtype=True),
        recurrent_case(conv, "long", [2048, 999], conv_tokens(512, 4), (512, 3), state="cache", tiers=(FULL,),
                       state_in_act_dtype=True),
        step_case("causal_conv1d_step", "cache", 5, conv_tokens(24, 4), (24, 3), deterministic=True,
                  state_in_act_dtype=True),
        step_case("causal_conv1d_step", "width_2_no_bias", 3, conv_tokens(8, 2, bias=False, act=None), (8, 1),
                  state_in_act_dtype=True),
    ]
    return cases + _memory_and_decay_cases() + _route_cases(cases)


def _memory_and_decay_cases() -> list[Case]:
    """Strided views of every argument, poison in invisible memory, and -inf / -1e4 log-decays. The
    interpreter backends run the smoke tier too: there, one case per op is strided and poisoned at once
    (the detail tells the two apart); full has each alone and the transposed layout."""
    la, gdr, ssd_op, conv = "linear_attention", "gated_delta_rule", "ssd", "causal_conv1d"
    H, K, V = 2, 16, 24
    # keys no query of the call sees: the oldest under a window, a sequence without queries, queries
    # before the first key, paged slots past seqused_k and unused blocks, unlisted top-k keys
    attention_family = [
        attention_case("window_chunked", [16, 7, 0], [80, 7, 9], window=(15, 0), sinks=True),
        paged_case("chunked_window", [20, 0, 12, 7], lq=[3, 2, 1, 7], bs=5, window=(6, 0), sinks=True),
        sparse_case("topk_unlisted_ends", [8, 0, 12], [10, 3, 15], topk=5, causal_indices=True, sinks=True,
                    unlisted_ends=True),
    ]
    # state caches: permuted rows, a -1, has_initial_state False on some, spare rows
    caches = [
        recurrent_case(la, "gla_cache", [6, 0, 13, 3], linear_tokens(H, K, V, "key"), (H, K, V), state="cache"),
        step_case("linear_attention_step", "cache", 5, linear_tokens(H, K, V, "key"), (H, K, V)),
        recurrent_case(gdr, "kda_cache", [6, 0, 13, 3], delta_tokens(2, 2, K, V, "key"), (2, K, V), state="cache"),
        step_case("gated_delta_rule_step", "cache", 5, delta_tokens(2, 4, K, V), (4, K, V)),
        recurrent_case(ssd_op, "cache_extras", [6, 0, 11, 3], ssd_tokens(4, 2, 8, 16, d_shape="head_p"), (4, 8, 16),
                       state="cache"),
        step_case("ssd_step", "cache", 5, ssd_tokens(4, 2, 8, 16), (4, 8, 16)),
        recurrent_case(conv, "cache_bias", [7, 0, 2, 12], conv_tokens(16, 4), (16, 3), state="cache",
                       state_in_act_dtype=True),
        step_case("causal_conv1d_step", "cache", 5, conv_tokens(24, 4), (24, 3), state_in_act_dtype=True),
    ]
    attention_family.append(merge_case("empty_parts", 26, h=3, dv=24, empty=0.3, sinks=True))
    both = attention_family + caches
    write = write_kv_case("write_kv_cache", 17)
    empty_key_block = attention_case("empty_key_block", [40, 33],
                                     mask=_with_empty_key_block(_random_layout(5, 2, 4), 1))
    one_page = paged_case("decode_one_full_page", [16, 16], bs=16, hq=6, hkv=3)
    strided_only = [  # more shapes and arguments, full tier
        attention_case("gptoss_style", [40, 25], hq=8, hkv=2, window=(16, 0), sinks=True, softcap=20.0),
        paged_case("decode_odd_block", [12, 7, 30], bs=5, window=(9, 0)),
        sparse_case("topk_sinks_softcap_empty_rows", 30, sinks=True, softcap=8.0, empty_rows=3),
        recurrent_case(ssd_op, "cache_no_z_limit", [10, 0, 27, 5],
                       ssd_tokens(4, 4, 8, 16, z=False, bias=False, softplus=False, limit=(0.01, 0.5)),
                       (4, 8, 16), state="cache"),
        recurrent_case(conv, "width_1", [7, 3], conv_tokens(8, 1), (8, 0), state="initial"),
    ]
    edge = [
        recurrent_case(la, "edge_decay", [66, 3], linear_tokens(H, K, V, "edge"), (H, K, V), state="initial"),
        recurrent_case(la, "edge_decay_gla", 40, linear_tokens(H, K, V, "edge_key"), (H, K, V), state="initial"),
        recurrent_case(gdr, "edge_decay", [66, 3], delta_tokens(2, 2, K, V, "edge"), (2, K, V), state="initial"),
        recurrent_case(gdr, "edge_decay_kda", 40, delta_tokens(2, 2, K, V, "edge_key"), (2, K, V), state="initial"),
        recurrent_case(ssd_op, "edge_decay", [66, 3], ssd_tokens(2, 1, 8, 16, edge=True), (2, 8, 16),
                       state="initial"),
        step_case("linear_attention_step", "edge_decay", 6, linear_tokens(H, K, V, "edge"), (H, K, V)),
        step_case("linear_attention_step", "edge_decay_gla", 6, linear_tokens(H, K, V, "edge_key"), (H, K, V),
                  tiers=(FULL,)),
        step_case("gated_delta_rule_step", "edge_decay_kda", 6, delta_tokens(2, 2, K, V, "edge_key"), (2, K, V)),
        step_case("gated_delta_rule_step", "edge_decay", 6, delta_tokens(2, 2, K, V, "edge"), (2, K, V),
                  tiers=(FULL,)),
        step_case("ssd_step", "edge_decay", 6, ssd_tokens(2, 1, 8, 16, edge=True), (2, 8, 16)),
    ]
    return ([strided(poisoned(c)) for c in both] + [strided(write), poisoned(empty_key_block)]
            # a decode over one full page per sequence: pages gathered from a permuted cache keep its axis order
            + [strided(one_page, "transposed", tiers=(SMOKE,))]
            + [poisoned(c, tiers=(FULL,)) for c in both] + [strided(c, tiers=(FULL,)) for c in both + strided_only]
            + [strided(c, "transposed", tiers=(FULL,)) for c in both + strided_only + [write]]
            + edge)


def _route_cases(cases: list[Case]) -> list[Case]:
    """Calls of the catalogue without lse, paged ones on heads-major caches: what SDPA on a GPU and IPEX
    compute (smoke: the shapes IPEX takes; full: the GPU routes' windows, masks, prefill, long calls)."""
    by_name = {(c.op, c.name): c for c in cases}
    a, p = "attention", "paged_attention"
    smoke = [(a, "noncausal"), (a, "causal_gqa4_d64"), (a, "varlen_mqa"), (a, "more_queries_noncausal"),
             (a, "decode_alignment")]
    full = [(a, "window_left"), (a, "head_dim_128"), (a, "long_causal_gqa"), (a, "empty_sequences"),
            (a, "mask_local_global"), (p, "decode_odd_block"), (p, "chunked_prefill"), (p, "long_decode")]
    picked = [(by_name[key], TIERS) for key in smoke] + [(by_name[key], (FULL,)) for key in full]
    routes = [without_lse(dataclasses.replace(c, heads_major=c.op == p), tiers) for c, tiers in picked]
    decode = without_lse(dataclasses.replace(by_name[(p, "decode")], heads_major=True))
    return routes + [poisoned(decode), write_kv_case("write_kv_cache_heads_major", 17, dv=16, heads_major=True)]


_CASES = _catalogue()
