"""Bad input as a new user would write it: a clear error naming the argument, and nothing changed."""
import pytest
import torch

import portable_attn as pa
from portable_attn import BlockMask

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


def test_zero_head_dim():
    with pytest.raises(ValueError, match="softmax_scale: the head dim is 0"):
        pa.attention(*qkv(d=0))
