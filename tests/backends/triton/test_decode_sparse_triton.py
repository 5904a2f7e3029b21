"""The triton backend's split-KV decode (decode.py), sparse_attention (sparse.py), write_kv_cache
(cache.py) and torch.library ops (library.py), run by Triton's interpreter on the CPU.

Skipped unless the process was started with TRITON_INTERPRET=1 (Triton fixes its mode when a kernel
is decorated, so it cannot be switched on here) and triton imports. CI runs this module in its own
process with the variable set, under pytest-xdist so that a crash of the interpreter costs one test:
    TRITON_INTERPRET=1 pytest -n 2 tests/backends/triton
Results are compared with the float64 reference (`backend="reference"`) by the conformance tolerance
(a small multiple of the reference's own error when it computes in the low precision).
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.backends.triton.child import VENDORS, assert_lowers, skip_unless_interpreting

skip_unless_interpreting()

import portable_attn as pa  # noqa: E402
from portable_attn.conformance.tolerance import compare  # noqa: E402
from portable_attn.masks import BlockMask  # noqa: E402
from portable_attn.backends.reference.precision import emulate  # noqa: E402

from portable_attn import library  # noqa: E402
from tests.backends.compare import paged_cache  # noqa: E402
from portable_attn.backends.triton import cache, decode, sparse  # noqa: E402

# float16 runs the bfloat16 kernels' paths (tl.dot on 16-bit inputs) with another store format: the conformance
# entry checks it on every op; here, under the interpreter, each dtype costs minutes of CI
DTYPES = (torch.float32, torch.bfloat16)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def reference(op, *args, dtype, **kw):
    """(exact float64 outputs, the reference's outputs when it computes like a `dtype` kernel)."""
    def up(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    exact = getattr(pa, op)(*map(up, args), **{n: up(a) for n, a in kw.items()}, return_lse=True,
                            backend="reference")
    with emulate(dtype):
        low = getattr(pa, op)(*args, **kw, return_lse=True, backend="reference")
    return exact, low


def assert_matches(got, op, *args, dtype, **kw):
    (ro, rl), (eo, el) = reference(op, *args, dtype=dtype, **kw)
    o, lse = got
    assert o.dtype == dtype and lse.dtype == torch.float32
    for name, g, r, e in (("out", o, ro, eo), ("lse", lse, rl, el)):
        v = compare(g, r, e, dtype)
        assert v.ok, f"{name}: {v.detail or f'err {v.err:.3g} > tol {v.tol:.3g}'}"


def paged_inputs(g, lens, bs, hq, hkv, d, dv=None, dtype=torch.float32, spare=3):
    """One decode query per sequence and a paged cache (tests.backends.compare.paged_cache)."""
    q = rand(g, len(lens), hq, d, dtype=dtype)
    return (q, *paged_cache(g, lens, bs, hkv, d, dv or d, dtype, spare))


# ---- split-KV decode ---------------------------------------------------------------------------

DECODE = [  # lens, block size, hq, hkv, d, dv, options
    ([37, 0, 64, 5], 3, 4, 2, 32, 32, {}),
    ([50, 23], 5, 8, 2, 24, 40, {"window_size": (11, 0), "sinks": True}),
    ([70, 1, 33], 16, 4, 1, 16, 16, {"softcap": 6.0, "sinks": True}),
    ([45, 19], 5, 6, 3, 32, 32, {"window_size": (60, 0), "softcap": 9.0}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens,bs,hq,hkv,d,dv,opts", DECODE)
def test_decode_split_counts_agree(lens, bs, hq, hkv, d, dv, opts, dtype):
    """1, 2 and 5 splits all match the reference; each is bitwise the same on a repeat."""
    g = gen(len(lens) * 100 + bs)
    q, kc, vc, table, used = paged_inputs(g, lens, bs, hq, hkv, d, dv, dtype)
    kw = dict(opts)
    if kw.pop("sinks", False):
        kw["sinks"] = rand(g, hq)
    scale = 1 / math.sqrt(d)
    outs = []
    for n in (1, 2, 5):
        got = decode.decode_split(q, kc, vc, table, used, softmax_scale=scale, return_lse=True, num_splits=n, **kw)
        assert_matches(got, "paged_attention", q, kc, vc, table, used, dtype=dtype, **kw)
        again = decode.decode_split(q, kc, vc, table, used, softmax_scale=scale, return_lse=True, num_splits=n,
                                    **kw)
        assert all(torch.equal(a, b) for a, b in zip(got, again)), f"{n} splits: not deterministic"
        outs.append(got)
    for o, lse in outs[1:]:  # the splits move where partial sums meet, not the answer
        assert float((o.double() - outs[0][0].double()).abs().max()) <= (1e-5 if dtype == torch.float32 else 2e-2)
        assert torch.equal(torch.isinf(lse), torch.isinf(outs[0][1]))


def test_empty_sequence_gives_zero_and_sink():
    """seqused_k = 0: o = 0 and lse = -inf, or the sink (also a -inf sink); with and without splits."""
    g = gen(5)
    q, kc, vc, table, used = paged_inputs(g, [0, 40, 0], 4, 4, 2, 16)
    sinks = torch.tensor([0.5, -math.inf, 2.0, -1.0])
    for n in (1, 3):
        o, lse = decode.decode_split(q, kc, vc, table, used, return_lse=True, num_splits=n)
        assert torch.equal(o[[0, 2]], torch.zeros_like(o[[0, 2]]))
        assert bool(torch.isneginf(lse[:, [0, 2]]).all())
        o, lse = decode.decode_split(q, kc, vc, table, used, sinks=sinks, return_lse=True, num_splits=n)
        assert torch.equal(o[[0, 2]], torch.zeros_like(o[[0, 2]]))
        assert torch.equal(lse[:, 0], sinks) and torch.equal(lse[:, 2], sinks)
        assert_matches((o, lse), "paged_attention", q, kc, vc, table, used, sinks=sinks, dtype=torch.float32)


def test_paged_decode_routes_to_split(monkeypatch):
    """A small batch with long contexts takes the split path through the public op; `out=` strided."""
    calls = []
    real = decode.decode_split

    def spy(*args, **kw):
        calls.append(decode.splits_for(args[0], args[1], args[3], window_size=kw["window_size"],
                                       max_seqlen_k=kw["max_seqlen_k"]))
        return real(*args, **kw)
    monkeypatch.setattr(decode, "decode_split", spy)
    g = gen(6)
    q, kc, vc, table, used = paged_inputs(g, [90, 61], 7, 4, 2, 32, dtype=torch.bfloat16)
    out = torch.full((4, 2, 32), float("nan"), dtype=torch.bfloat16).transpose(0, 1)  # [S, Hq, Dv], strided
    got = pa.paged_attention(q, kc, vc, table, used, out=out, return_lse=True, backend="triton")
    assert calls and calls[0] > 1
    assert got[0] is out
    assert_matches(got, "paged_attention", q, kc, vc, table, used, dtype=torch.bfloat16)


def test_decode_strided_views_and_big_group():
    """Caches as views of one buffer, a transposed q, and a kv group larger than one tile's rows."""
    g = gen(7)
    lens, bs, hkv, d = [41, 9], 5, 1, 16
    hq = 2 * decode.entry(torch.empty(0)).max_rows  # two tiles of query heads per kv head
    nb = 20
    kv = rand(g, nb, 2, bs, hkv, d)
    table = torch.randperm(nb, generator=g).view(10, 2).T.to(torch.int32)  # a strided block table
    used = torch.tensor(lens, dtype=torch.int32)
    q = rand(g, hq, 2, d).transpose(0, 1)
    sinks = rand(g, hq)
    for n in (1, 4):
        got = decode.decode_split(q, kv[:, 0], kv[:, 1], table, used, sinks=sinks, return_lse=True, num_splits=n)
        assert_matches(got, "paged_attention", q, kv[:, 0], kv[:, 1], table, used, sinks=sinks,
                       dtype=torch.float32)


def test_split_count():
    """Long contexts of a small batch split; a batch that fills the device, or short contexts, do not."""
    cpu = torch.device("cpu")
    assert decode.split_count(1, 1, 4096, cpu) > 1
    assert decode.split_count(64, 8, 4096, cpu) == 1
    assert decode.split_count(1, 1, decode.MIN_SPLIT_KEYS, cpu) == 1
    assert decode.split_count(1, 1, 10 ** 7, cpu) <= decode.MAX_SPLITS


# ---- sparse_attention --------------------------------------------------------------------------

def sparse_inputs(g, qlens, klens, hq, hkv, d, topk, dtype, empty_rows=()):
    """Distinct positions per (query, kv head) inside the query's own sequence, -1 padded; some rows empty."""
    tq, tk = sum(qlens), sum(klens)
    idx = torch.full((tq, hkv, topk), -1, dtype=torch.int32)
    t = 0
    for nq, nk in zip(qlens, klens):
        for _ in range(nq):
            for h in range(hkv):
                n = min(nk, topk - 1)
                slots = torch.randperm(topk, generator=g)[:n]
                idx[t, h, slots] = torch.randperm(nk, generator=g)[:n].to(torch.int32)
            t += 1
    idx[list(empty_rows)] = -1
    cu = (torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32),
          torch.tensor([0] + list(torch.tensor(klens).cumsum(0)), dtype=torch.int32))
    return (rand(g, tq, hq, d, dtype=dtype), rand(g, tk, hkv, d, dtype=dtype), rand(g, tk, hkv, d, dtype=dtype),
            idx, cu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [{}, {"softcap": 7.0, "sinks": True}], ids=["plain", "softcap_sinks"])
def test_sparse_varlen(dtype, opts):
    """-1 slots, an empty sequence, empty rows, GQA, a topk that is not a multiple of the tile."""
    g = gen(11)
    q, k, v, idx, (cq, ck) = sparse_inputs(g, [9, 0, 14, 1], [20, 6, 31, 3], 6, 2, 32, 21, dtype,
                                           empty_rows=(2, 15))
    kw = {"softcap": opts.get("softcap", 0.0)}
    if opts.get("sinks"):
        kw["sinks"] = torch.tensor([0.3, -math.inf, 1.0, -2.0, 0.0, 4.0])
    got = pa.sparse_attention(q, k, v, idx, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True, backend="triton",
                              **kw)
    assert_matches(got, "sparse_attention", q, k, v, idx, cu_seqlens_q=cq, cu_seqlens_k=ck, dtype=dtype, **kw)
    again = pa.sparse_attention(q, k, v, idx, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True, backend="triton",
                                **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    o, lse = got
    assert torch.equal(o[[2, 15]], torch.zeros_like(o[[2, 15]]))


def test_sparse_one_sequence_strided_and_empty():
    """No cu_seqlens, strided q/k/v/indices and out; no queries; no keys at all."""
    g = gen(12)
    q, k, v, idx, _ = sparse_inputs(g, [17], [40], 4, 4, 16, 8, torch.float32)
    qs = torch.stack([q, q], dim=-1)[..., 0]  # head dim of stride 2
    ks, vs = k.transpose(0, 1).contiguous().transpose(0, 1), v.transpose(0, 1).contiguous().transpose(0, 1)
    idx_s = torch.stack([idx, idx], dim=-1)[..., 1]
    out = torch.full((4, 17, 16), float("nan")).transpose(0, 1)
    got = pa.sparse_attention(qs, ks, vs, idx_s, out=out, return_lse=True, backend="triton")
    assert got[0] is out
    assert_matches(got, "sparse_attention", q, k, v, idx, dtype=torch.float32)
    o, lse = pa.sparse_attention(q[:0], k, v, idx[:0], return_lse=True, backend="triton")
    assert o.shape == (0, 4, 16) and lse.shape == (4, 0)
    o, lse = pa.sparse_attention(q[:3], k[:0], v[:0], torch.full((3, 4, 5), -1, dtype=torch.int32),
                                 return_lse=True, backend="triton")
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())


def test_bad_unchecked_indices_never_fault(monkeypatch):
    """With checks off, out-of-range indices give some answer, never a memory fault (masked/clamped)."""
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", "0")
    g = gen(13)
    q, k, v, idx, (cq, ck) = sparse_inputs(g, [5, 4], [12, 9], 2, 1, 16, 6, torch.float32)
    idx[0, 0, 0], idx[1, 0, 1], idx[6, 0, 2] = 10 ** 6, -7, 11  # 11 >= Lk = 9 of the second sequence
    o = sparse.sparse_attention(q, k, v, idx, cu_seqlens_q=cq, cu_seqlens_k=ck)
    assert not bool(torch.isnan(o).any())
    q, kc, vc, table, used = paged_inputs(g, [30, 20], 4, 2, 1, 16)
    table[0, 1], table[1, 0] = 10 ** 6, -3
    used[1] = 10 ** 6  # beyond the table's capacity
    for n in (1, 3):
        o = decode.decode_split(q, kc, vc, table, used, num_splits=n)
        assert not bool(torch.isnan(o).any())
    k, v = rand(g, 3, 2, 8), rand(g, 3, 2, 8)
    kcache, vcache = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    cache.write_kv_cache(k, v, kcache, vcache, torch.tensor([10 ** 6, -5, 3], dtype=torch.int64))
    assert torch.equal(kcache[0, 3], k[2]) and int((kcache != 0).sum()) == 16


# ---- write_kv_cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,slot_dtype", [(torch.float32, torch.int64), (torch.bfloat16, torch.int32),
                                              (torch.float16, torch.int64)], ids=str)
def test_write_kv_cache_views_of_one_buffer(dtype, slot_dtype):
    """k/v caches as kv[:, 0] / kv[:, 1] (and a head-strided k), -1 skipped, other slots bit-identical."""
    g = gen(21)
    nb, bs, hkv, d, dv, t = 7, 3, 2, 12, 20, 11
    kv = rand(g, nb, 2, bs, hkv, dv, dtype=dtype)
    k = rand(g, hkv, t, d, dtype=dtype).transpose(0, 1)
    v = rand(g, t, hkv, dv, dtype=dtype)
    slots = torch.randperm(nb * bs, generator=g)[:t].to(slot_dtype)
    slots[[1, 6]] = -1
    mine, ref = kv.clone(), kv.clone()
    pa.write_kv_cache(k, v, mine[:, 0, :, :, :d], mine[:, 1], slots, backend="triton")
    pa.write_kv_cache(k, v, ref[:, 0, :, :, :d], ref[:, 1], slots, backend="reference")
    assert torch.equal(mine, ref)
    assert torch.equal(mine[:, 0, :, :, d:], kv[:, 0, :, :, d:])  # the buffer's tail past D: untouched


def test_write_then_split_decode():
    """write_kv_cache into a paged cache (block size 5), then split decode == attention on the keys."""
    g = gen(22)
    lens, bs, hq, hkv, d = [47, 12], 5, 4, 2, 16
    nb = 22
    table = torch.randperm(nb, generator=g)[:2 * 10].view(2, 10).to(torch.int32)
    k, v = rand(g, sum(lens), hkv, d), rand(g, sum(lens), hkv, d)
    slots = torch.cat([table[i, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
                       for i, n in enumerate(lens)])
    kc, vc = torch.zeros(nb, bs, hkv, d), torch.zeros(nb, bs, hkv, d)
    pa.write_kv_cache(k, v, kc, vc, slots, backend="triton")
    q = rand(g, 2, hq, d)
    used = torch.tensor(lens, dtype=torch.int32)
    got = decode.decode_split(q, kc, vc, table, used, return_lse=True, num_splits=3)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 47, 59], dtype=torch.int32)
    want = pa.attention(q, k, v, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], causal=True, return_lse=True,
                        backend="reference")
    assert float((got[0] - want[0]).abs().max()) < 1e-5 and float((got[1] - want[1]).abs().max()) < 1e-5


# ---- torch.library ops and torch.compile -------------------------------------------------------

def test_opcheck():
    """Schemas, fake kernels and declared mutations agree with what the ops do."""
    g = gen(31)
    q, k, v, idx, (cq, ck) = sparse_inputs(g, [3, 2], [7, 5], 4, 2, 16, 4, torch.float32)
    out = torch.empty(5, 4, 16)
    torch.library.opcheck(torch.ops.portable_attn.sparse_attention.default,
                          (q, k, v, idx, cq, ck, 0.0, None, 0.25, "triton", out))
    kc, vc = torch.zeros(3, 4, 2, 16), torch.zeros(3, 4, 2, 16)
    torch.library.opcheck(torch.ops.portable_attn.write_kv_cache.default,
                          (k, v, kc, vc, torch.tensor([0, 5, -1, 11, 2, 7, 9, 1, 3, 4, 6, 8], dtype=torch.int32),
                           "triton"))
    q, kc, vc, table, used = paged_inputs(g, [20, 3], 4, 4, 2, 16)
    torch.library.opcheck(torch.ops.portable_attn.paged_attention.default,
                          (q, kc, vc, table, used, None, None, None, True, (-1, -1), 0.0, None, None,
                           None, None, None, (1, 1), None, "triton", torch.empty(2, 4, 16)))
    mask = BlockMask.strided(24, 5, 3, (8, 8))
    q, k, v = rand(g, 24, 4, 16), rand(g, 24, 2, 16), rand(g, 24, 2, 16)
    torch.library.opcheck(torch.ops.portable_attn.attention.default,
                          (q, k, v, None, None, None, None, True, (-1, -1), 0.0, None, None, mask.layout,
                           mask.partial_index, mask.partial_masks, mask.block_size, mask.seq_len, "triton",
                           torch.empty(24, 4, 16)))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compile_fullgraph(compiler):
    """A decode step (write the new token, paged split decode, top-k sparse attention, a block-masked
    chunked prefill) traces with fullgraph=True and matches eager, caches updated in place."""
    torch._dynamo.reset()
    g = gen(32)
    nb, bs, hq, hkv, d = 16, 5, 4, 2, 16
    kv = rand(g, nb, 2, bs, hkv, d)
    table = torch.randperm(nb, generator=g).view(2, 8).to(torch.int32)  # 40 keys a row: split decode
    used = torch.tensor([29, 17], dtype=torch.int32)
    slots = torch.stack([table[i, (n - 1) // bs].long() * bs + (n - 1) % bs for i, n in enumerate(used.tolist())])
    k_new, v_new, q = rand(g, 2, hkv, d), rand(g, 2, hkv, d), rand(g, 2, hq, d)
    idx = torch.stack([torch.randperm(nb * bs, generator=g)[:6] for _ in range(2 * hkv)]).view(2, hkv, 6)
    idx = idx.to(torch.int32)
    idx[0, 1, 2] = -1
    mask = BlockMask.strided(40, 5, 3, (8, 8))
    cq = torch.tensor([0, 3, 5], dtype=torch.int32)
    qp = rand(g, 5, hq, d)

    def step(q, k_new, v_new, kv, idx, qp):
        kc, vc = kv[:, 0], kv[:, 1]
        pa.write_kv_cache(k_new, v_new, kc, vc, slots, backend="triton")
        o1, lse = pa.paged_attention(q, kc, vc, table, used, return_lse=True, softcap=20.0, backend="triton")
        o2 = pa.sparse_attention(q, kc.flatten(0, 1), vc.flatten(0, 1), idx, backend="triton")
        o3 = pa.paged_attention(qp, kc, vc, table, used, cu_seqlens_q=cq, max_seqlen_q=3, block_mask=mask,
                                backend="triton")
        return o1 + o2, lse, o3

    kv_eager, kv_comp = kv.clone(), kv.clone()
    want = step(q, k_new, v_new, kv_eager, idx, qp)
    got = torch.compile(step, fullgraph=True, backend=compiler)(q, k_new, v_new, kv_comp, idx, qp)
    assert torch.equal(kv_comp, kv_eager)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())



# ---- the compiled kernels -----------------------------------------------------------------------

@pytest.mark.parametrize("vendor", VENDORS)
def test_kernels_compile_for_gpu_targets(vendor):
    """Lower the split-KV, merge, sparse, cache-write and merge_attention_states kernels for a GPU target, with
    and without sinks and packing (None pointers for the absent ones)."""
    assert_lowers(vendor, """
        from portable_attn.backends.triton import cache, decode, merge, sparse

        def sig(fn, ptrs, floats=("scale", "softcap")):
            consts = {p.name for p in fn.params if p.is_constexpr}
            return {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32")
                    for n in fn.arg_names}

        runs = []
        for act, on in (("bf16", True), ("fp32", False)):
            ptrs = {n: "*" + act for n in ("q_ptr", "kc_ptr", "vc_ptr", "k_ptr", "v_ptr", "o_ptr")}
            ptrs.update({n: "*i32" for n in ("bt_ptr", "su_ptr", "idx_ptr", "cuq_ptr", "cuk_ptr", "slot_ptr")})
            ptrs.update({n: "*fp32" for n in ("sink_ptr", "lse_ptr", "ow_ptr", "lw_ptr")})
            for fn, ce in ((decode._split_kernel, dict(FINAL=on, HAS_SOFTCAP=on, BLOCK_G=16, BLOCK_N=64)),
                           (decode._merge_kernel, dict(BLOCK_SPLITS=8)),
                           (sparse._sparse_kernel, dict(VARLEN=on, HAS_SOFTCAP=on, BLOCK_G=16, BLOCK_K=64))):
                s, c = sig(fn, ptrs), dict(ce, HAS_SINKS=on, BLOCK_D=128, BLOCK_DV=128)
                c = {n: v for n, v in c.items() if n in s}
                absent(s, c, [n for n in ("sink_ptr", "cuq_ptr", "cuk_ptr") if n in s and not on])
                runs.append((fn, s, c))
            fn = cache._write_kv_kernel
            ptrs.update(kc_ptr="*" + act, vc_ptr="*" + act)
            runs.append((fn, sig(fn, ptrs), dict(BLOCK_H=4, BLOCK_D=128, BLOCK_DV=64)))
            fn = merge._merge_kernel
            ptrs = {n: "*" + act for n in ("oa_ptr", "ob_ptr", "out_ptr")}
            ptrs.update({n: "*fp32" for n in ("la_ptr", "lb_ptr", "sink_ptr", "lse_ptr")})
            s, c = sig(fn, ptrs), dict(HAS_SINKS=on, WRITE_LSE=on, BLOCK_H=4, BLOCK_DV=256)
            absent(s, c, [] if on else ["sink_ptr", "lse_ptr"])
            runs.append((fn, s, c))
    """, {"num_warps": 4, "num_stages": 1})
