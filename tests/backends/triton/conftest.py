"""Shared by the triton tests (each module skips itself unless TRITON_INTERPRET=1 was set at process
start: Triton fixes its mode when a kernel is decorated)."""
import pytest


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """The triton backend serves the CPU in interpret mode."""
    monkeypatch.setenv("PORTABLE_ATTN_INTERPRET", "1")
