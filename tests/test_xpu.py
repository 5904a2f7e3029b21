"""Intel XPU with the hardware faked (no Intel GPU is here): the probe `portable-attn info` shows, the
triton backend's availability there, and dispatch to the XPU defaults."""
import importlib.machinery
import importlib.util
import types

import pytest
import torch

from portable_attn import cli, platforms, registry
from portable_attn.dispatch import make_call
from portable_attn.platforms import Platform


@pytest.fixture
def xpu(monkeypatch):
    """torch.xpu reporting two Max 1550 tiles."""
    props = types.SimpleNamespace(name="Intel(R) Data Center GPU Max 1550", driver_version="1.6.31294+21",
                                  has_subgroup_2d_block_io=True)
    fake = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                 get_device_properties=lambda i: props)
    monkeypatch.setattr(torch, "xpu", fake, raising=False)
    return props


@pytest.mark.parametrize("has_triton", [True, False])
def test_summary_names_device_driver_block_io_and_triton(xpu, monkeypatch, has_triton):
    monkeypatch.setattr(platforms, "triton_xpu", lambda: has_triton)
    text = platforms.xpu_summary()
    assert text.startswith("2 x Intel(R) Data Center GPU Max 1550, driver 1.6.31294+21; 2D block IO: yes")
    assert ("Triton XPU backend: importable" in text) == has_triton
    assert ("missing (install torch from the XPU index" in text) != has_triton


def test_no_xpu_no_summary():
    assert platforms.xpu_summary() is None


def test_info_shows_the_xpu(xpu, monkeypatch, capsys):
    monkeypatch.setattr(platforms, "triton_xpu", lambda: True)
    monkeypatch.setattr(cli, "default_device", lambda: "cpu")  # the support table's inputs stay on the CPU
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "platforms on this machine: xpu, cpu" in out
    assert "xpu: 2 x Intel(R) Data Center GPU Max 1550, driver 1.6.31294+21" in out


@pytest.mark.parametrize("has_triton", [True, False])
def test_triton_needs_its_xpu_backend(xpu, monkeypatch, has_triton):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PORTABLE_ATTN_INTERPRET", raising=False)
    if importlib.util.find_spec("triton") is None:  # the plain test run: triton reported installed
        real = importlib.util.find_spec
        stand_in = importlib.machinery.ModuleSpec("triton", None)
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: stand_in if name == "triton" else real(name, *a))
    monkeypatch.setattr("portable_attn.backends.triton.triton_xpu", lambda: has_triton)
    reason = registry.get("triton").available()
    assert (reason is None) == has_triton
    if not has_triton:
        assert "Triton has no XPU backend here" in reason


def test_xpu_calls_go_to_the_xpu_defaults(monkeypatch):
    """PORTABLE_ATTN_PLATFORM=xpu: an XPU call, the triton kernels first; the torch backend serves XPU by name."""
    monkeypatch.setenv("PORTABLE_ATTN_PLATFORM", "xpu")
    call = make_call("attention", dict(q=torch.randn(4, 2, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8)))
    assert call.platform == Platform.XPU
    assert registry.DEFAULT_PRIORITY[Platform.XPU][0] == "triton"
    assert registry.get("torch").serves(Platform.XPU) is None
