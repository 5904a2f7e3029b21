"""A tiny hybrid transformers model (Bamba: attention, causal conv1d and SSD layers) run through portable_attn
on the triton backend under Triton's interpreter equals transformers' eager path (prefill logits and a short
greedy generation of a left-padded batch of two prompts).

Skipped unless the process was started with TRITON_INTERPRET=1 (Triton fixes its mode when a kernel is
decorated): `TRITON_INTERPRET=1 PORTABLE_ATTN_INTERPRET=1 pytest tests/backends/triton/test_transformers_triton.py`.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 in the environment at process start", allow_module_level=True)
pytest.importorskip("triton")

from tests.integrations.models import check_model  # noqa: E402


def test_bamba_on_triton_matches_eager():
    patched = check_model("bamba", "triton", new_tokens=4)  # the interpreter runs each kernel call in Python
    assert len(patched.replaced) == 4
