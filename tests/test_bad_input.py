"""Bad input as a new user would write it: a clear error naming the argument, and nothing changed."""
import functools
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

import portable_attn as pa
from portable_attn import BlockMask
from portable_attn.ops import make_call

torch.manual_seed(0)
I32 = torch.int32


def qkv(t=8, hq=4, hkv=2, d=16, dtype=torch.float32):
    return torch.randn(t, hq, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype)


def cu(*values):
    return torch.tensor(values, dtype=I32)


def paged(bs=4, nb=6, s=2, hkv=2, d=16):
    q = torch.randn(s, 4, d)
    kc, vc = torch.randn(nb, bs, hkv, d), torch.randn(nb, bs, hkv, d)
    return q, kc, vc, torch.tensor([[0, 1], [2, 3]], dtype=I32), torch.tensor([5, 8], dtype=I32)


def merge_parts(t=8, h=2, dv=16):
    return torch.randn(t, h, dv), torch.randn(h, t)


def la(t=6, h=2, k=8, v=8):
    return torch.randn(t, h, k), torch.randn(t, h, k), torch.randn(t, h, v)


BAD = {
    "rank": (lambda: pa.attention(torch.randn(8, 16), *qkv()[1:]), ValueError, r"q: expected a 3-D tensor \[Tq, Hq, D\], got shape \(8, 16\)"),
    "not a tensor": (lambda: pa.attention([[1.0]], *qkv()[1:]), TypeError, "q: expected a tensor"),
    "gqa ratio": (lambda: pa.attention(*qkv(hq=4, hkv=3)), ValueError, "k: head count 3 must divide the q head count 4"),
    "head dim": (lambda: pa.attention(torch.randn(8, 4, 32), *qkv()[1:]), ValueError, "k: axis 2 must be the head dim D of q = 32"),
    "dtype mix": (lambda: pa.attention(qkv()[0].half(), *qkv()[1:]), TypeError, r"k: expected dtype float16 \(the dtype of q\), got float32"),
    "int activations": (lambda: pa.attention(*(x.to(I32) for x in qkv())), TypeError, "q: expected dtype float32, float16, bfloat16 or float64, got int32"),
    "cu non-monotonic": (lambda: pa.attention(*qkv(), cu_seqlens_q=cu(0, 5, 3, 8), cu_seqlens_k=cu(0, 2, 4, 8)), ValueError, "cu_seqlens_q: must be non-decreasing"),
    "cu start": (lambda: pa.attention(*qkv(), cu_seqlens_q=cu(1, 8), cu_seqlens_k=cu(0, 8)), ValueError, "cu_seqlens_q: must start at 0, got 1"),
    "cu end": (lambda: pa.attention(*qkv(), cu_seqlens_q=cu(0, 7), cu_seqlens_k=cu(0, 8)), ValueError, "cu_seqlens_q: last entry must be the token count 8, got 7"),
    "cu int64": (lambda: pa.attention(*qkv(), cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=cu(0, 8)), TypeError, "cu_seqlens_q: expected dtype int32, got int64"),
    "cu one side": (lambda: pa.attention(*qkv(), cu_seqlens_q=cu(0, 8)), ValueError, "cu_seqlens_q / cu_seqlens_k: give both or neither"),
    "cu counts differ": (lambda: pa.attention(*qkv(), cu_seqlens_q=cu(0, 8), cu_seqlens_k=cu(0, 4, 8)), ValueError, "cu_seqlens_k: expected 2 entries like cu_seqlens_q, got 3"),
    "max_seqlen short": (lambda: pa.attention(*qkv(), cu_seqlens_q=cu(0, 3, 8), cu_seqlens_k=cu(0, 3, 8), max_seqlen_q=4), ValueError, r"max_seqlen_q: 4 is shorter than the longest sequence \(5\)"),
    "window < -1": (lambda: pa.attention(*qkv(), window_size=(-2, 0)), ValueError, r"window_size: each side must be >= -1 \(-1 = unbounded\), got \(-2, 0\)"),
    "window not pair": (lambda: pa.attention(*qkv(), window_size=4), TypeError, "window_size: expected a pair of ints"),
    "softcap < 0": (lambda: pa.attention(*qkv(), softcap=-1.0), ValueError, "softcap: expected a value >= 0.0, got -1.0"),
    "causal not bool": (lambda: pa.attention(*qkv(), causal="yes"), TypeError, "causal: expected a bool"),
    "sinks shape": (lambda: pa.attention(*qkv(), sinks=torch.zeros(3)), ValueError, "sinks: axis 0 must be Hq = 4"),
    "sinks dtype": (lambda: pa.attention(*qkv(), sinks=torch.zeros(4, dtype=torch.float64)), TypeError, "sinks: expected dtype float32, got float64"),
    "out shape": (lambda: pa.attention(*qkv(), out=torch.empty(8, 4, 8)), ValueError, r"out: expected shape \(8, 4, 16\), got \(8, 4, 8\)"),
    "out dtype": (lambda: pa.attention(*qkv(), out=torch.empty(8, 4, 16, dtype=torch.float16)), TypeError, "out: expected dtype float32, got float16"),
    "block_mask type": (lambda: pa.attention(*qkv(), block_mask=torch.ones(1, 1, 1, 1)), TypeError, "block_mask: expected a portable_attn.BlockMask"),
    "block_mask heads": (lambda: pa.attention(*qkv(), block_mask=BlockMask.from_layout(torch.full((1, 3, 1, 1), 2), (8, 8))), ValueError, "block_mask: layout axis 1 must be 1 or the query head count 4, got 3"),
    "block_mask small": (lambda: pa.attention(*qkv(t=20), block_mask=BlockMask.from_layout(torch.full((1, 1, 1, 1), 2), (8, 8))), ValueError, r"block_mask: layout covers 1x1 blocks of 8x8, the longest sequence \(20 keys\) needs 3x3"),
    "paged decode count": (lambda: pa.paged_attention(torch.randn(3, 4, 16), *paged()[1:]), ValueError, r"q: axis 0 must be one query per sequence \(decode, no cu_seqlens_q\): S = 2"),
    "paged block id": (lambda: pa.paged_attention(*paged()[:3], torch.tensor([[0, 1], [2, 9]], dtype=I32), paged()[4]), ValueError, r"block_table: block ids in use must lie in \[0, 6\), got 9"),
    "paged negative block id": (lambda: pa.paged_attention(*paged()[:3], torch.tensor([[0, -1], [2, 3]], dtype=I32), paged()[4]), ValueError, r"block_table: block ids in use must lie in \[0, 6\), got -1"),
    "paged seqused too long": (lambda: pa.paged_attention(*paged()[:4], torch.tensor([5, 9], dtype=I32)), ValueError, r"seqused_k: key counts .* must lie in \[0, 9\), got 9"),
    "paged cache dims": (lambda: pa.paged_attention(paged()[0], paged()[1], torch.randn(6, 3, 2, 16), *paged()[3:]), ValueError, "v_cache: axis 1 must be the block size BS of k_cache = 4"),
    "topk out of range": (lambda: pa.sparse_attention(*qkv(), torch.full((8, 2, 3), 8, dtype=I32)), ValueError, r"indices: key positions must lie in \[-1, Lk\) .* lists 8 with Lk = 8"),
    "topk below -1": (lambda: pa.sparse_attention(*qkv(), torch.full((8, 2, 3), -2, dtype=I32)), ValueError, "lists -2"),
    "topk duplicate": (lambda: pa.sparse_attention(*qkv(), torch.tensor([[[1, 1, -1]] * 2] * 8, dtype=I32)), ValueError, "indices: one query's key positions lists 1 twice"),
    "topk per-sequence range": (lambda: pa.sparse_attention(*qkv(), torch.full((8, 2, 1), 4, dtype=I32), cu_seqlens_q=cu(0, 4, 8), cu_seqlens_k=cu(0, 4, 8)), ValueError, "lists 4 with Lk = 4"),
    "state index range": (lambda: pa.linear_attention(*la(), initial_state=torch.zeros(3, 2, 8, 8), state_indices=cu(3)), ValueError, r"state_indices: state cache rows \(or -1\) must lie in \[-1, 3\), got 3"),
    "state index duplicate": (lambda: pa.linear_attention(*la(), initial_state=torch.zeros(3, 2, 8, 8), state_indices=cu(1, 1), cu_seqlens=cu(0, 2, 6)), ValueError, "state_indices: state cache rows lists 1 twice"),
    "has_initial_state alone": (lambda: pa.linear_attention(*la(), has_initial_state=torch.ones(1, dtype=torch.bool)), ValueError, "has_initial_state: only meaningful with state_indices"),
    "state_indices without cache": (lambda: pa.linear_attention(*la(), state_indices=cu(0)), ValueError, "initial_state: state_indices needs a state cache"),
    "initial_state shape": (lambda: pa.linear_attention(*la(), initial_state=torch.zeros(1, 2, 8, 4)), ValueError, r"initial_state: expected shape \(1, 2, 8, 8\)"),
    "gate shape": (lambda: pa.linear_attention(*la(), g=torch.zeros(6, 3)), ValueError, r"g: expected shape \(6, 2\), got \(6, 3\)"),
    "delta gqa": (lambda: pa.gated_delta_rule(*la(h=2)[:2], torch.randn(6, 3, 8), torch.zeros(6, 3), torch.ones(6, 3)), ValueError, "q: head count 2 must divide the v head count 3"),
    "delta no g": (lambda: pa.gated_delta_rule(*la(), None, torch.ones(6, 2)), TypeError, "g: expected a log-decay tensor"),
    "ssd groups": (lambda: pa.ssd(torch.randn(5, 4, 8), torch.rand(5, 4), -torch.rand(4), torch.randn(5, 3, 16), torch.randn(5, 3, 16)), ValueError, "B: head count 3 must divide the x head count 4"),
    "ssd dt_limit": (lambda: pa.ssd(torch.randn(5, 4, 8), torch.rand(5, 4), -torch.rand(4), torch.randn(5, 2, 16), torch.randn(5, 2, 16), dt_limit=(1.0, 0.5)), ValueError, r"dt_limit: expected low <= high, got \(1.0, 0.5\)"),
    "ssd D shape": (lambda: pa.ssd(torch.randn(5, 4, 8), torch.rand(5, 4), -torch.rand(4), torch.randn(5, 2, 16), torch.randn(5, 2, 16), D=torch.ones(4, 7)), ValueError, r"D: expected shape \(4, 8\), got \(4, 7\)"),
    "conv activation": (lambda: pa.causal_conv1d(torch.randn(5, 8), torch.randn(8, 4), activation="relu"), ValueError, "activation: expected None or 'silu', got 'relu'"),
    "conv weight": (lambda: pa.causal_conv1d(torch.randn(5, 8), torch.randn(6, 4)), ValueError, "weight: axis 0 must be the channel count C of x = 8"),
    "step state rows": (lambda: pa.causal_conv1d_step(torch.randn(4, 8), torch.randn(8, 4), state=torch.zeros(2, 8, 3)), ValueError, "state: without state_indices the cache needs at least bsz = 4 rows, got 2"),
    "step state_indices range": (lambda: pa.ssd_step(torch.randn(2, 4, 8), torch.rand(2, 4), -torch.rand(4), torch.randn(2, 2, 16), torch.randn(2, 2, 16), state=torch.zeros(3, 4, 8, 16), state_indices=cu(0, -3)), ValueError, r"state_indices: state cache rows \(or -1\) must lie in \[-1, 3\), got -3"),
    "slot out of range": (lambda: pa.write_kv_cache(*qkv()[1:], *paged()[1:3], torch.arange(8, dtype=I32) + 20), ValueError, r"slot_mapping: cache slots \(or -1\) must lie in \[-1, 24\), got 27"),
    "slot duplicate": (lambda: pa.write_kv_cache(*qkv()[1:], *paged()[1:3], torch.tensor([0, 1, 2, 3, 4, 5, 6, 6], dtype=I32)), ValueError, "slot_mapping: cache slots lists 6 twice"),
    # sizes that may not be 0 (SPEC "Empty sizes")
    "zero heads": (lambda: pa.attention(*qkv(hq=0)), ValueError, r"q: the head count Hq \(axis 1\) must be at least 1, got shape \(8, 0, 16\)"),
    "zero kv heads": (lambda: pa.attention(qkv()[0], *qkv(hkv=0)[1:]), ValueError, r"k: the kv head count Hkv \(axis 1\) must be at least 1"),
    "zero head dim": (lambda: pa.attention(*qkv(d=0)), ValueError, r"q: the head dim D \(axis 2\) must be at least 1"),
    "zero value dim": (lambda: pa.attention(*qkv()[:2], torch.randn(8, 2, 0)), ValueError, r"v: the value head dim Dv \(axis 2\) must be at least 1"),
    "zero block size": (lambda: pa.paged_attention(paged()[0], torch.randn(6, 0, 2, 16), torch.randn(6, 0, 2, 16), *paged()[3:]), ValueError, r"k_cache: the block size BS \(axis 1\) must be at least 1"),
    "write zero heads": (lambda: pa.write_kv_cache(torch.randn(3, 0, 16), torch.randn(3, 0, 16), *paged()[1:3], torch.arange(3, dtype=I32)), ValueError, r"k: the kv head count Hkv \(axis 1\)"),
    "sparse zero head dim": (lambda: pa.sparse_attention(*qkv(d=0), torch.zeros(8, 2, 1, dtype=I32)), ValueError, r"q: the head dim D \(axis 2\)"),
    "merge lse shape": (lambda: pa.merge_attention_states(*merge_parts(), torch.randn(8, 2, 16), torch.randn(8, 2)), ValueError, r"lse_b: expected shape \(2, 8\) = \[H, T\] of o_a, got \(8, 2\)"),
    "merge lse dtype": (lambda: pa.merge_attention_states(*merge_parts(), torch.randn(8, 2, 16), torch.randn(2, 8).half()), TypeError, "lse_b: expected dtype float32, got float16"),
    "merge o_b shape": (lambda: pa.merge_attention_states(*merge_parts(), torch.randn(8, 2, 15), torch.randn(2, 8)), ValueError, r"o_b: expected the shape of o_a \(8, 2, 16\), got \(8, 2, 15\)"),
    "merge dtype mix": (lambda: pa.merge_attention_states(*merge_parts(), torch.randn(8, 2, 16).half(), torch.randn(2, 8)), TypeError, r"o_b: expected dtype float32 \(the dtype of o_a\), got float16"),
    "merge sinks shape": (lambda: pa.merge_attention_states(*merge_parts(), *merge_parts(), sinks=torch.zeros(3)), ValueError, "sinks: axis 0 must be the head count H of o_a = 2"),
    "merge zero heads": (lambda: pa.merge_attention_states(torch.randn(8, 0, 16), torch.randn(0, 8), torch.randn(8, 0, 16), torch.randn(0, 8)), ValueError, r"o_a: the head count H \(axis 1\)"),
    "linear zero key dim": (lambda: pa.linear_attention(*la(k=0)), ValueError, r"q: the key dim K \(axis 2\) must be at least 1"),
    "linear step zero heads": (lambda: pa.linear_attention_step(*la(t=2, h=0), state=torch.zeros(2, 0, 8, 8)), ValueError, r"q: the head count H \(axis 1\)"),
    "delta zero value dim": (lambda: pa.gated_delta_rule(*la(v=0), torch.zeros(6, 2), torch.ones(6, 2)), ValueError, r"v: the value dim V \(axis 2\) must be at least 1"),
    "delta step zero value heads": (lambda: pa.gated_delta_rule_step(*la(t=2)[:2], torch.randn(2, 0, 8), torch.zeros(2, 0), torch.ones(2, 0), state=torch.zeros(2, 0, 8, 8)), ValueError, r"v: the value head count Hv \(axis 1\)"),
    "ssd zero state size": (lambda: pa.ssd(torch.randn(5, 4, 8), torch.rand(5, 4), -torch.rand(4), torch.randn(5, 2, 0), torch.randn(5, 2, 0)), ValueError, r"B: the state size N \(axis 2\) must be at least 1"),
    "ssd zero groups": (lambda: pa.ssd(torch.randn(5, 4, 8), torch.rand(5, 4), -torch.rand(4), torch.randn(5, 0, 16), torch.randn(5, 0, 16)), ValueError, r"B: the group count G \(axis 1\)"),
    "ssd step zero head dim": (lambda: pa.ssd_step(torch.randn(2, 4, 0), torch.rand(2, 4), -torch.rand(4), torch.randn(2, 2, 16), torch.randn(2, 2, 16), state=torch.zeros(2, 4, 0, 16)), ValueError, r"x: the head dim P \(axis 2\)"),
    "conv zero channels": (lambda: pa.causal_conv1d(torch.randn(5, 0), torch.randn(0, 4)), ValueError, r"x: the channel count C \(axis 1\) must be at least 1"),
    "conv zero width": (lambda: pa.causal_conv1d(torch.randn(5, 8), torch.randn(8, 0)), ValueError, r"weight: the conv width W \(axis 1\) must be at least 1"),
    "conv step zero width": (lambda: pa.causal_conv1d_step(torch.randn(2, 8), torch.randn(8, 0), state=torch.zeros(2, 8, 0)), ValueError, r"weight: the conv width W \(axis 1\)"),
    # numbers: NumPy scalars are accepted, bools and other types are not
    "window numpy bool": (lambda: pa.attention(*qkv(), window_size=(np.bool_(True), 0)), TypeError, "window_size: expected a pair of ints"),
    "window float": (lambda: pa.attention(*qkv(), window_size=(np.float32(2), 0)), TypeError, "window_size: expected a pair of ints"),
    "scale bool": (lambda: pa.attention(*qkv(), softmax_scale=True), TypeError, "softmax_scale: expected a finite float, got True"),
    "scale string": (lambda: pa.linear_attention(*la(), scale="0.5"), TypeError, "scale: expected a finite float, got '0.5'"),
    "max_seqlen float": (lambda: pa.attention(*qkv(), max_seqlen_q=np.float64(8)), ValueError, "max_seqlen_q: expected a non-negative int or None"),
    "max_seqlen numpy short": (lambda: pa.attention(*qkv(), cu_seqlens_q=cu(0, 3, 8), cu_seqlens_k=cu(0, 3, 8), max_seqlen_q=np.int64(4)), ValueError, r"max_seqlen_q: 4 is shorter than the longest sequence \(5\)"),
    "dt_limit string": (lambda: pa.ssd(torch.randn(5, 4, 8), torch.rand(5, 4), -torch.rand(4), torch.randn(5, 2, 16), torch.randn(5, 2, 16), dt_limit=("0", 1.0)), TypeError, "dt_limit: expected a pair of floats"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_named(name):
    fn, exc, match = BAD[name]
    with pytest.raises(exc, match=match):
        fn()


def test_failed_write_changes_nothing():
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    kc, vc = torch.randn(6, 4, 2, 16), torch.randn(6, 4, 2, 16)
    before = kc.clone(), vc.clone()
    with pytest.raises(ValueError, match="slot_mapping"):
        pa.write_kv_cache(k, v, kc, vc, torch.tensor([0, 5, 99], dtype=I32))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


PAGED_VALUES = [
    ([[0, 1], [2, 9]], [5, 8], r"block_table: block ids in use must lie in \[0, 6\), got 9"),
    ([[0, -1], [2, 3]], [5, 8], r"block_table: block ids in use must lie in \[0, 6\), got -1"),
    ([[0, 1], [2, 3]], [-1, 8], r"seqused_k: key counts .* must lie in \[0, 9\), got -1"),
    ([[0, 1], [2, 3]], [5, 9], r"seqused_k: key counts .* must lie in \[0, 9\), got 9"),
    ([[0, 1], [2, 3]], [5, 8], r"max_seqlen_k: 7 is shorter than the longest sequence \(8\)"),
    ([[0, 9], [2, -1]], [4, 0], None),  # ids out of range in entries no key uses: accepted
]


@pytest.mark.parametrize("path", ["decode", "prefill", "large table"])
@pytest.mark.parametrize("table, used, error", PAGED_VALUES)
def test_paged_index_values_on_each_path(path, table, used, error):
    """The decode table's few values are read as lists, a prefill's or a large table's in NumPy: the same
    errors (and the same unused entries ignored) either way."""
    q, kc, vc, _, _ = paged()
    bt, su = torch.tensor(table, dtype=I32), torch.tensor(used, dtype=I32)
    kw = dict(max_seqlen_k=7) if error and "max_seqlen_k" in error else {}
    if path == "prefill":
        kw |= dict(cu_seqlens_q=cu(0, 1, 2), max_seqlen_q=1)
    elif path == "large table":  # more entries than checks.SMALL: 2048 more sequences, without keys
        q, bt = torch.cat([q, q.new_zeros(2048, *q.shape[1:])]), bt.repeat(1025, 1)
        su = torch.cat([su, su.new_zeros(2048)])
    if error is None:
        pa.paged_attention(q, kc, vc, bt, su, **kw)
        return
    with pytest.raises(ValueError, match=error):
        pa.paged_attention(q, kc, vc, bt, su, **kw)


@pytest.mark.parametrize("check", ["1", "0"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("table, used, error", PAGED_VALUES)
def test_paged_index_values_of_a_remembered_call(table, used, error, backend, check, monkeypatch):
    """A decode whose signature passed before: the reference replays the op's value checks, the cpu backend skips
    them (its decode kernel checks the values it reads before it writes, CpuBackend.checks_values). The same
    errors and `out` untouched either way; with PORTABLE_ATTN_CHECK=0 the cpu backend still refuses them."""
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", check)
    q, kc, vc, _, _ = paged()
    kw = dict(max_seqlen_k=7 if error and "max_seqlen_k" in error else 8, backend=backend)
    good = pa.paged_attention(q, kc, vc, torch.tensor([[0, 1], [2, 3]], dtype=I32), torch.tensor([5, 7], dtype=I32),
                              out=torch.full_like(q, math.nan), **kw)
    assert not good.isnan().any()  # the signature is remembered now
    out = torch.full_like(q, math.nan)
    call = functools.partial(pa.paged_attention, q, kc, vc, torch.tensor(table, dtype=I32),
                             torch.tensor(used, dtype=I32), out=out, **kw)
    if error is None:
        call()
        assert not out.isnan().any()
    elif check == "0" and backend == "reference":  # unchecked: out-of-range values are the caller's (SPEC)
        return
    else:
        with pytest.raises(ValueError, match=error):
            call()
        assert out.isnan().all()


def test_failed_step_changes_nothing():
    state = torch.randn(4, 2, 8, 8)
    before = state.clone()
    q, k, v = la(t=2)
    with pytest.raises(ValueError, match="state_indices"):
        pa.linear_attention_step(q, k, v, state=state, state_indices=cu(0, 7))
    assert torch.equal(state, before)


def test_value_checks_can_be_turned_off(monkeypatch):
    """PORTABLE_ATTN_CHECK=0 skips the index value checks (shape checks stay)."""
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", "0")
    pa.attention(*qkv(), cu_seqlens_q=cu(0, 3, 8), cu_seqlens_k=cu(0, 3, 8), max_seqlen_q=1)
    with pytest.raises(ValueError, match="q: expected a 3-D tensor"):
        pa.attention(torch.randn(8, 16), *qkv()[1:])


def test_float64_is_accepted_by_the_reference():
    q, k, v = (x.double() for x in qkv())
    assert pa.attention(q, k, v).dtype == torch.float64


def test_mask_built_for_shorter_sequences_is_refused():
    mask = BlockMask.from_mask_mod(lambda s, h, p, j: j <= p, 10, (16, 16))
    with pytest.raises(ValueError, match="block_mask: built for sequences of up to 10 positions, the longest sequence has 12 keys"):
        pa.attention(*qkv(t=12), block_mask=mask)


# ---- numbers: NumPy scalars are Python numbers to the backends (SPEC "Numbers") ----------------------

def test_numpy_scalars_are_normalised():
    a = make_call("attention", dict(q=qkv()[0], k=qkv()[1], v=qkv()[2], causal=True, softcap=np.float32(30),
                                    window_size=(np.int64(3), np.int32(0)), softmax_scale=np.float16(0.25),
                                    max_seqlen_q=np.int64(8), max_seqlen_k=np.uint8(8))).args
    assert a["window_size"] == (3, 0) and all(type(w) is int for w in a["window_size"])
    assert type(a["softcap"]) is float and type(a["softmax_scale"]) is float and a["softmax_scale"] == 0.25
    assert type(a["max_seqlen_q"]) is int and type(a["max_seqlen_k"]) is int
    x = torch.randn(5, 4, 8)
    s = make_call("ssd", dict(x=x, dt=torch.rand(5, 4), A=-torch.rand(4), B=torch.randn(5, 2, 16),
                              C=torch.randn(5, 2, 16), dt_limit=(np.float32(0.5), np.float64(math.inf)))).args
    assert s["dt_limit"] == (0.5, math.inf) and all(type(v) is float for v in s["dt_limit"])
    r = make_call("linear_attention", dict(q=x, k=x, v=x, scale=np.float64(0.5))).args
    assert type(r["scale"]) is float and r["scale"] == 0.5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_numpy_scalars_give_the_python_numbers_result(backend):
    q, k, v = qkv(t=12)
    cu_ = cu(0, 5, 12)
    nums = dict(window_size=(np.int64(3), np.int64(1)), softcap=np.float64(5.0), softmax_scale=np.float32(0.5),
                max_seqlen_q=np.int32(7), max_seqlen_k=np.int32(7))
    want = pa.attention(q, k, v, cu_seqlens_q=cu_, cu_seqlens_k=cu_, causal=True, backend=backend,
                        **{n: (tuple(int(w) for w in x) if n == "window_size" else x.item()) for n, x in nums.items()})
    got = pa.attention(q, k, v, cu_seqlens_q=cu_, cu_seqlens_k=cu_, causal=True, backend=backend, **nums)
    assert torch.equal(got, want)


# ---- out= overlapping an input (SPEC "out= must not overlap any input") -----------------------------

def overlapping_calls():
    """(name, call, the input it overlaps, tensors that must stay unchanged): fresh tensors per call."""
    x = torch.randn(6, 8)
    yield "conv out=x", lambda: pa.causal_conv1d(x, torch.randn(8, 4), out=x, backend="triton"), "x", [x]
    x2 = torch.randn(6, 8)
    yield "conv out=x[::1]", lambda: pa.causal_conv1d(x2, torch.randn(8, 4), out=x2[::1]), "x", [x2]
    q, k, v = qkv()
    yield "attention out=q", lambda: pa.attention(q, k, v, out=q), "q", [q]
    buf = torch.randn(2 * 8 * 4 * 16)
    q2 = buf[: 8 * 4 * 16].view(8, 4, 16)
    tail = buf[8 * 4 * 16 - 1: 2 * 8 * 4 * 16 - 1].view(8, 4, 16)  # shares one element with q2
    yield "attention last byte", lambda: pa.attention(q2, *qkv()[1:], out=tail), "q", [buf]
    state = torch.randn(4, 2, 8, 8)
    into_state = state[1:].reshape(-1)[: 2 * 2 * 8].view(2, 2, 8)
    yield "step out in state", lambda: pa.linear_attention_step(*la(t=2), state=state, out=into_state), "state", [state]
    cache = torch.randn(3, 2, 8, 8)
    in_cache = cache.transpose(0, 2)[:6, :2, 0]  # [T=6, H=2, V=8], a strided view into the cache
    yield "sequence out in cache", lambda: pa.linear_attention(
        *la(), initial_state=cache, state_indices=cu(1), out=in_cache), "initial_state", [cache]
    kc = torch.randn(6, 4, 2, 16)
    pq, _, vc, bt, su = paged()
    yield "paged out in k_cache", lambda: pa.paged_attention(pq, kc, vc, bt, su, out=kc[2].view(-1)[:128].view(2, 4, 16)), "k_cache", [kc]
    g = torch.randn(6, 2, 8)
    qd, kd, vd = la()
    yield "delta out=g", lambda: pa.gated_delta_rule(qd, kd, vd, g, torch.rand(6, 2), out=g[:, :, :8]), "g", [g]


@pytest.mark.parametrize("case", [c[0] for c in overlapping_calls()])
def test_out_overlapping_an_input_is_refused_before_writing(case):
    _, fn, name, kept = next(c for c in overlapping_calls() if c[0] == case)
    before = [t.clone() for t in kept]
    with pytest.raises(ValueError, match=f"out: overlaps the memory of the input {name};"):
        fn()
    assert all(torch.equal(t, b) for t, b in zip(kept, before))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_out_next_to_an_input_in_one_buffer_is_fine(backend):
    """Adjacent views of one buffer share no byte: accepted, and the input is read intact."""
    n = 8 * 4 * 16
    buf = torch.randn(2 * n)
    q, out = buf[:n].view(8, 4, 16), buf[n:].view(8, 4, 16)
    _, k, v = qkv()
    want = pa.attention(q.clone(), k, v, backend=backend)
    out.fill_(math.nan)
    assert pa.attention(q, k, v, out=out, backend=backend) is out
    assert torch.equal(out, want)


# ---- empty sizes on every backend (SPEC "Empty sizes", "Empty sequences") ---------------------------

BACKENDS = [
    "reference", "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
        reason="triton runs on the CPU only under its interpreter: start pytest with TRITON_INTERPRET=1")),
    pytest.param("pallas", marks=pytest.mark.skipif(
        os.environ.get("PORTABLE_ATTN_INTERPRET") != "1" or importlib.util.find_spec("jax") is None,
        reason="pallas runs on the CPU only in interpret mode: start pytest with PORTABLE_ATTN_INTERPRET=1 "
               "JAX_PLATFORMS=cpu (and jax installed)")),
]
NAN = math.nan


def poisoned(*shape):
    return torch.full(shape, NAN)


def attention_empties(be):
    """(name, call, check of its result): token, sequence and top-k counts of 0."""
    q, k, v = torch.randn(3, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    sinks = torch.randn(4)
    none = torch.full((4, 3), -math.inf)

    def nothing_visible(lse_want):
        return lambda r: torch.equal(r[0], torch.zeros(3, 4, 8)) and torch.equal(r[1], lse_want)

    yield ("attention T=0", lambda: pa.attention(q[:0], k[:0], v[:0], out=poisoned(0, 4, 8), return_lse=True, backend=be),
           lambda r: r[0].shape == (0, 4, 8) and r[1].shape == (4, 0))
    yield ("attention Tk=0", lambda: pa.attention(q, k[:0], v[:0], out=poisoned(3, 4, 8), return_lse=True, backend=be),
           nothing_visible(none))
    yield ("attention Tk=0 sinks", lambda: pa.attention(q, k[:0], v[:0], sinks=sinks, return_lse=True, backend=be),
           nothing_visible(sinks[:, None].expand(4, 3)))
    z = torch.zeros(1, dtype=I32)
    yield ("attention S=0", lambda: pa.attention(q[:0], k[:0], v[:0], cu_seqlens_q=z, cu_seqlens_k=z, backend=be),
           lambda r: r.shape == (0, 4, 8))
    kc, vc = torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)
    yield ("paged S=0", lambda: pa.paged_attention(q[:0], kc, vc, torch.zeros(0, 2, dtype=I32), z[:0], backend=be),
           lambda r: r.shape == (0, 4, 8))
    yield ("paged no blocks", lambda: pa.paged_attention(
        q, kc[:0], vc[:0], torch.zeros(3, 0, dtype=I32), torch.zeros(3, dtype=I32), out=poisoned(3, 4, 8),
        return_lse=True, backend=be), nothing_visible(none))
    yield ("paged prefill T=0", lambda: pa.paged_attention(
        q[:0], kc, vc, torch.tensor([[0], [1]], dtype=I32), torch.tensor([3, 2], dtype=I32),
        cu_seqlens_q=torch.zeros(3, dtype=I32), backend=be), lambda r: r.shape == (0, 4, 8))
    kc0, vc0 = kc.clone(), vc.clone()
    yield ("write T=0", lambda: pa.write_kv_cache(k[:0], v[:0], kc, vc, z[:0], backend=be),
           lambda r: r is None and torch.equal(kc, kc0) and torch.equal(vc, vc0))
    yield ("sparse topk=0", lambda: pa.sparse_attention(
        q, k, v, torch.zeros(3, 2, 0, dtype=I32), out=poisoned(3, 4, 8), return_lse=True, backend=be),
        nothing_visible(none))
    yield ("sparse T=0", lambda: pa.sparse_attention(q[:0], k, v, torch.zeros(0, 2, 3, dtype=I32), backend=be),
           lambda r: r.shape == (0, 4, 8))
    o_nan = torch.full((3, 4, 8), NAN)                     # empty parts' rows are not read
    yield ("merge T=0", lambda: pa.merge_attention_states(o_nan[:0], none[:, :0], o_nan[:0], none[:, :0], return_lse=True,
                                                          out=poisoned(0, 4, 8), backend=be),
           lambda r: r[0].shape == (0, 4, 8) and r[1].shape == (4, 0))
    yield ("merge both parts empty", lambda: pa.merge_attention_states(o_nan, none, o_nan, none, out=poisoned(3, 4, 8),
                                                                       return_lse=True, backend=be), nothing_visible(none))
    yield ("merge both empty sinks", lambda: pa.merge_attention_states(o_nan, none, o_nan, none, sinks=sinks,
                                                                       return_lse=True, backend=be),
           nothing_visible(sinks[:, None].expand(4, 3)))


def recurrent_args(op, t):
    """Arguments of sequence form `op` with `t` tokens (the step form with bsz = t), and the state tail."""
    h, d = 2, 8
    if op == "causal_conv1d":
        return dict(x=torch.randn(t, d), weight=torch.randn(d, 4)), (d, 3)
    if op == "ssd":
        return dict(x=torch.randn(t, h, d), dt=torch.rand(t, h), A=-torch.rand(h), B=torch.randn(t, 1, 4),
                    C=torch.randn(t, 1, 4)), (h, d, 4)
    a = dict(q=torch.randn(t, h, d), k=torch.randn(t, h, d), v=torch.randn(t, h, d))
    if op == "gated_delta_rule":
        a.update(g=-torch.rand(t, h), beta=torch.rand(t, h))
    return a, (h, d, d)


def recurrent_empties(be, op):
    step = getattr(pa, op + "_step")
    seq = getattr(pa, op)
    a, tail = recurrent_args(op, 0)
    out_shape = tuple(a["x" if "x" in a else "v"].shape)
    init = torch.randn((1,) + tail)
    yield (f"{op} T=0", lambda: seq(**a, initial_state=init, output_final_state=True, out=poisoned(*out_shape),
                                    backend=be),
           lambda r: r[0].shape == out_shape and torch.equal(r[1], init))
    yield (f"{op} S=0", lambda: seq(**a, cu_seqlens=torch.zeros(1, dtype=I32), output_final_state=True, backend=be),
           lambda r: r[0].shape == out_shape and r[1].shape == (0,) + tail)
    cache = torch.randn((3,) + tail)
    kept = cache.clone()
    # two empty sequences through a cache: row 2 passes through, row 0 is reset (no initial state), row 1 untouched
    yield (f"{op} empty sequences", lambda: seq(
        **a, cu_seqlens=torch.zeros(3, dtype=I32), initial_state=cache, state_indices=cu(2, 0),
        has_initial_state=torch.tensor([True, False]), backend=be),
        lambda r: torch.equal(cache[1:], kept[1:]) and torch.equal(cache[0], torch.zeros(tail)))
    state = torch.randn((2,) + tail)
    before = state.clone()
    yield (f"{op}_step bsz=0", lambda: step(**a, state=state, out=poisoned(*out_shape), backend=be),
           lambda r: r.shape == out_shape and torch.equal(state, before))


def empties(be):
    yield from attention_empties(be)
    for op in ("linear_attention", "gated_delta_rule", "ssd", "causal_conv1d"):
        yield from recurrent_empties(be, op)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c[0] for c in empties("reference")])
def test_empty_sizes_work(backend, case, monkeypatch):
    if backend in ("triton", "pallas"):
        monkeypatch.setenv("PORTABLE_ATTN_INTERPRET", "1")
    _, fn, ok = next(c for c in empties(backend) if c[0] == case)
    assert ok(fn())
