"""A tiny hybrid transformers model (Bamba: attention, causal conv1d and SSD layers) run through portable_attn
on the pallas backend in Pallas' TPU interpret mode equals transformers' eager path (prefill logits and a
short greedy generation of a left-padded batch of two prompts).

Run with `PORTABLE_ATTN_INTERPRET=1 JAX_PLATFORMS=cpu pytest tests/backends/pallas/test_transformers_pallas.py`.
"""
from __future__ import annotations

from tests.integrations.models import check_model


def test_bamba_on_pallas_matches_eager():
    patched = check_model("bamba", "pallas", new_tokens=4)  # interpret mode compiles each new shape
    assert len(patched.replaced) == 4
