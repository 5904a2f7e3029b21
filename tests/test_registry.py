"""Backend registry and selection: env vars, backend=, priority lists, strict mode, entry points."""
import logging
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
import torch

import portable_attn
from portable_attn import BackendUnavailable, NotSupported, registry
from portable_attn.backend import Backend, Call
from portable_attn.platforms import Platform
from portable_attn.backends.reference import BACKEND as REFERENCE


class Fake(Backend):
    """A backend that runs the reference but can be unavailable or refuse calls."""

    platforms = frozenset({Platform.CPU})

    def __init__(self, name, unavailable=None, refuses=None):
        self.name, self.unavailable, self.refuses = name, unavailable, refuses
        self.calls = 0

    def available(self):
        return self.unavailable

    def supports(self, call):
        return self.refuses or super().supports(call)

    def run(self, call):
        self.calls += 1
        return REFERENCE.run(call)


@pytest.fixture
def registered(monkeypatch):
    def install(*fakes, priority=None):
        known = dict(registry.backends()) | {f.name: f for f in fakes}
        monkeypatch.setattr(registry, "backends", lambda: known)
        if priority:
            monkeypatch.setitem(registry.DEFAULT_PRIORITY, Platform.CPU, priority)
        registry._log_once.cache_clear()
        return fakes
    return install


def _qkv():
    torch.manual_seed(0)
    return torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)


def test_reference_is_registered_and_serves_cpu():
    assert "reference" in registry.backends()
    assert registry.backends()["reference"].available() is None


def test_default_on_cpu_without_cpu_backend_is_reference(registered):
    registered(priority=("missing-fast-one", "reference"))
    call = Call("attention", {"q": torch.zeros(1, 1, 1)}, Platform.CPU)
    assert registry.select(call).name == "reference"


def test_backend_argument_beats_env(registered, monkeypatch):
    a, b = registered(Fake("a"), Fake("b"))
    monkeypatch.setenv("PORTABLE_ATTN_BACKEND", "a")
    portable_attn.attention(*_qkv(), backend="b")
    assert (a.calls, b.calls) == (0, 1)
    portable_attn.attention(*_qkv())
    assert (a.calls, b.calls) == (1, 1)


def test_env_priority_list_falls_back_and_logs_once(registered, monkeypatch, caplog):
    a, b = registered(Fake("a", refuses="head dim 8 is too small"), Fake("b"))
    monkeypatch.setenv("PORTABLE_ATTN_BACKEND", "a,b")
    with caplog.at_level(logging.INFO, logger="portable_attn"):
        portable_attn.attention(*_qkv())
        portable_attn.attention(*_qkv())
    assert b.calls == 2 and a.calls == 0
    skips = [r for r in caplog.records if "skips backend a" in r.getMessage()]
    assert len(skips) == 1 and "head dim 8 is too small" in skips[0].getMessage()


def test_strict_forbids_fallback(registered, monkeypatch):
    registered(Fake("a", refuses="no bf16"), Fake("b"))
    monkeypatch.setenv("PORTABLE_ATTN_BACKEND", "a,b")
    monkeypatch.setenv("PORTABLE_ATTN_STRICT", "1")
    with pytest.raises(NotSupported, match="no bf16"):
        portable_attn.attention(*_qkv())


def test_strict_applies_to_the_platform_default(registered, monkeypatch):
    registered(Fake("a", unavailable="kernels not built"), priority=("a", "reference"))
    monkeypatch.setenv("PORTABLE_ATTN_STRICT", "1")
    with pytest.raises(BackendUnavailable, match="kernels not built"):
        portable_attn.attention(*_qkv())
    monkeypatch.delenv("PORTABLE_ATTN_STRICT")
    portable_attn.attention(*_qkv())  # falls back to the reference


def test_forced_backend_that_cannot_run_says_why(registered):
    registered(Fake("gone", unavailable="triton not installed"), Fake("picky", refuses="head dim 8 < 16"))
    with pytest.raises(BackendUnavailable, match="triton not installed"):
        portable_attn.attention(*_qkv(), backend="gone")
    with pytest.raises(NotSupported, match="head dim 8 < 16"):
        portable_attn.attention(*_qkv(), backend="picky")


def test_every_backend_in_a_list_refusing_gives_all_reasons(registered):
    registered(Fake("x", refuses="reason-x"), Fake("y", unavailable="reason-y"))
    with pytest.raises(NotSupported, match="reason-x.*reason-y"):
        portable_attn.attention(*_qkv(), backend=["x", "y"])


def test_platform_not_served(registered):
    registered(Fake("cpu-only"))
    call = Call("attention", {"q": torch.zeros(1, 1, 1)}, Platform.TPU)
    with pytest.raises(NotSupported, match="runs on cpu, not tpu"):
        registry.select(call, "cpu-only")


@pytest.mark.parametrize("spec", ["nope", "reference,nope", ""])
def test_unknown_backend_in_env_is_an_error_listing_valid_names(monkeypatch, spec):
    monkeypatch.setenv("PORTABLE_ATTN_BACKEND", spec)
    if spec == "":
        portable_attn.attention(*_qkv())  # empty means unset
        return
    with pytest.raises(ValueError, match=r"PORTABLE_ATTN_BACKEND: unknown backend 'nope'; valid names: .*reference"):
        portable_attn.attention(*_qkv())


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match=r"backend=: unknown backend 'flash'; valid names: .*reference"):
        portable_attn.attention(*_qkv(), backend="flash")


def _entry_points(*eps):
    return lambda group: [e for e in eps if e.group == group]


def test_entry_point_backends_are_registered(monkeypatch):
    ep = EntryPoint("plugin", "tests.test_registry:PLUGIN", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", _entry_points(ep))
    registry.rediscover()
    try:
        assert registry.backends()["plugin"] is PLUGIN
        out = portable_attn.attention(*_qkv(), backend="plugin")
        assert out.shape == (6, 2, 8) and PLUGIN.calls == 1
    finally:
        monkeypatch.undo()
        registry.rediscover()


@pytest.mark.parametrize("target,match", [
    ("tests.test_registry:PLUGIN_MISNAMED", "must name a Backend called 'plugin'"),
    ("portable_attn.backends.reference:BACKEND", "already exists"),
])
def test_bad_entry_points_are_rejected(monkeypatch, target, match):
    name = "reference" if "reference" in target else "plugin"
    monkeypatch.setattr(registry, "entry_points", _entry_points(EntryPoint(name, target, registry.ENTRY_POINT_GROUP)))
    registry.rediscover()
    try:
        with pytest.raises(RuntimeError, match=match):
            registry.backends()
    finally:
        monkeypatch.undo()
        registry.rediscover()


PLUGIN = Fake("plugin")
PLUGIN_MISNAMED = Fake("other")


def test_no_top_level_backends_module_is_imported():
    """`backends/` installs as portable_attn.backends; importing it as `backends` would register twice."""
    import portable_attn.backends as pkg

    assert "backends" not in sys.modules
    assert pkg.__name__ == "portable_attn.backends"


def test_declaring_backends_imports_no_kernel_module():
    """Probing availability must not import kernels (Triton fixes its interpret mode at decoration)."""
    code = ("import sys; from portable_attn import registry\n"
            "for b in registry.backends().values(): b.available()\n"
            "print(sorted(m for m in sys.modules if m in {b.module for b in registry.backends().values()}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
