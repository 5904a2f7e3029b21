"""transformers models run through portable_attn (register + patch) equal transformers' own eager path on
the cpu and reference backends: tiny random-weight configs of the hybrid and attention-feature models."""
from __future__ import annotations

import functools
import time

import pytest

from tests.integrations.models import CONFIGS, build, check_model, prompts, run

# the kernel functions each model's patch must replace (attention-only models replace none)
HYBRID = {"qwen3_next": {"causal_conv1d_fn", "causal_conv1d_update", "torch_chunk_gated_delta_rule",
                         "torch_recurrent_gated_delta_rule"},
          **dict.fromkeys(("mamba2", "bamba", "falcon_h1"), {"causal_conv1d_fn", "causal_conv1d_update",
                                                              "mamba2_chunk_scan", "mamba2_selective_state_update"})}


@functools.cache
def eager(name: str):
    return run(build(name), *prompts())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_matches_eager(name, backend):
    patched = check_model(name, backend, eager(name))
    assert {r.rsplit(".", 1)[1] for r in patched.replaced} == HYBRID.get(name, set())


def test_register_is_idempotent_and_registers_the_mask_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from portable_attn.integrations import transformers as pat

    assert pat.register() == pat.register("cpu") == "portable_attn"
    assert AttentionInterface._global_mapping["portable_attn"].keywords == {"backend": "cpu"}
    # without a mask function transformers would pass attention_mask=None and padded rows would differ
    assert "portable_attn" in AttentionMaskInterface._global_mapping


def test_patch_undo_restores_the_model_functions():
    import transformers.models.mamba2.modeling_mamba2 as mm

    from portable_attn.integrations import transformers as pat

    model = build("mamba2")
    before = mm.mamba2_chunk_scan
    handle = pat.patch(model, backend="reference")
    assert mm.mamba2_chunk_scan is not before
    with pytest.raises(RuntimeError, match="already patched"):
        pat.patch(model)
    handle.undo()
    assert mm.mamba2_chunk_scan is before and model.config._attn_implementation == "eager"


def test_attention_refuses_a_dense_mask():
    import torch

    from portable_attn.integrations import transformers as pat

    model = build("mistral")
    q = torch.randn(2, 4, 3, 8)
    k = v = torch.randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match="attention_mask: expected the 2D padding mask"):
        pat.attention_forward(model.model.layers[0].self_attn, q, k, v, torch.ones(2, 1, 3, 3, dtype=torch.bool))


def test_e2e_bench_case_runs_and_agrees():
    from portable_attn.bench import e2e

    t0 = time.perf_counter()
    (row,) = e2e.run(("fp32",), backend="cpu", quick=True)
    assert row["same_tokens"] and row["backends"]["gated_delta_rule"] == "cpu", row
    assert row["portable_attn_prefill_ms"] > 0 and row["transformers_decode_tok_s"] > 0
    assert time.perf_counter() - t0 < 60


def test_packed_varlen_kwargs_equal_the_padded_batch():
    """transformers' packed inputs (batch 1, cu_seq_lens_q/k) give what the left-padded batch of the same
    sequences gives (the padded path is checked against eager above)."""
    import torch

    from portable_attn.integrations import transformers as pat

    module = build("mistral").model.layers[0].self_attn
    gen = torch.Generator().manual_seed(1)
    lens = (5, 3)
    q, k, v = (torch.randn(1, h, sum(lens), 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 8])
    packed, _ = pat.attention_forward(module, q, k, v, None, scaling=0.3, sliding_window=4, cu_seq_lens_q=cu,
                                      cu_seq_lens_k=cu)
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]], dtype=torch.bool)
    padded = [torch.zeros(2, h, 5, 8) for h in (4, 2, 2)]
    for p, x in zip(padded, (q, k, v)):
        p[0], p[1, :, 2:] = x[0, :, :5], x[0, :, 5:]
    batch, _ = pat.attention_forward(module, *padded, mask, scaling=0.3, sliding_window=4)
    torch.testing.assert_close(packed[0], batch[mask], rtol=0, atol=1e-6)
    assert torch.equal(batch[~mask], torch.zeros_like(batch[~mask]))


@pytest.mark.parametrize("mask", [[[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],    # left padding: runs, sliced
                                  [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]],    # right and left
                                  [[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]]])   # holes: indexed
def test_packing_takes_what_the_mask_keeps_and_is_reused_while_its_content_is(mask):
    import torch

    from portable_attn.integrations import transformers as pat

    keep = torch.tensor(mask, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, h, 6, 4, generator=gen).transpose(1, 2) for h in (3, 2))  # [B, L, H, D] views
    pq, pk, pv, cu_q, cu_k, rows = pat._pack(q, k, k, keep.long())
    assert torch.equal(pq, q[keep]) and torch.equal(pk, k[keep]) and torch.equal(pv, k[keep])
    assert cu_q.tolist() == cu_k.tolist() == [0, int(keep[0].sum()), int(keep.sum())] and cu_q.dtype == torch.int32
    out = torch.zeros(2, 6, 3, 4)
    rows.scatter(out, pq)
    assert torch.equal(out[keep], q[keep]) and not out[~keep].any()
    first = pat._PACKING[0]
    pat._pack(q, k, k, keep.long().clone())                    # another tensor, the same content: reused
    assert pat._PACKING[0] is first
    changed = keep.long().clone()
    changed[0, -1] = 1 - changed[0, -1]
    assert torch.equal(pat._pack(q, k, k, changed)[1], k[changed.bool()]) and pat._PACKING[0] is not first
