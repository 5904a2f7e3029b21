"""`portable-attn info` and `check` as a user runs them."""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from portable_attn import cli, registry
from portable_attn.conformance import cases
from portable_attn.backend import Backend
from portable_attn.errors import NotSupported
from tests.conformance.test_suite_catches import Mutant, _noisy

CLI = [sys.executable, "-m", "portable_attn.cli"]
SWITCHES = ("PORTABLE_ATTN_INTERPRET", "TRITON_INTERPRET", "PORTABLE_ATTN_BACKEND", "PORTABLE_ATTN_PLATFORM",
            "PORTABLE_ATTN_STRICT", "COLUMNS")


def run(*args, env=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=600)


def plain_env(**extra) -> dict:
    """This environment without the switches: a CPU machine where triton and pallas cannot run."""
    return {k: v for k, v in os.environ.items() if k not in SWITCHES} | extra


def test_info_shows_platform_backends_and_support():
    res = run("info", env={**os.environ, "COLUMNS": "200"})  # wide enough that no header wraps
    assert res.returncode == 0, res.stderr
    assert "platforms on this machine: cpu" in res.stdout
    assert "reference" in res.stdout and "yes" in res.stdout
    for op in ("attention", "gated_delta_rule_step", "causal_conv1d"):
        assert op in res.stdout
    assert "does not take" in res.stdout and "float64" in res.stdout


def test_check_writes_reports_and_passes(tmp_path):
    res = run("check", "--backend", "reference", "--op", "attention", "--op", "ssd_step", "--dtype", "bfloat16",
              "--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml"),
              "--markdown", str(tmp_path / "m.md"), "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reference" in res.stdout and "passed" in res.stdout and " 0 failed" in res.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["op"] for r in data["results"]} == {"attention", "ssd_step"}
    assert all(r["status"] == "pass" for r in data["results"])
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("name") == "reference" and int(suite.get("tests")) == len(data["results"])
    assert "| `attention` | yes (bfloat16) |" in (tmp_path / "m.md").read_text()


def test_check_exits_nonzero_on_failure(monkeypatch, capsys):
    known = dict(registry.backends()) | {"noisy": Mutant("noisy", after=_noisy)}
    monkeypatch.setattr(registry, "backends", lambda: known)
    code = cli.main(["check", "--backend", "noisy", "--op", "causal_conv1d_step", "--dtype", "float32", "--quiet"])
    assert code == 1
    assert re.search(r"^FAIL noisy causal_conv1d_step \S+ \[float32\]: ", capsys.readouterr().out, re.M)


def test_unknown_backend_is_a_clear_error():
    res = run("check", "--backend", "nope", "--quiet")
    assert res.returncode == 2
    assert re.search(r"unknown backend .nope.; valid names: .*reference", res.stdout)


@pytest.mark.parametrize("argv", [["check", "--tier", "huge"], ["frobnicate"]])
def test_bad_arguments(argv):
    assert run(*argv).returncode == 2


@pytest.mark.parametrize("command", ["check", "bench"])
def test_a_missing_gpu_is_a_clear_error(command):
    res = run(command, "--device", "cuda", "--quiet" if command == "check" else "--no-memory")
    assert res.returncode == 2
    assert "this machine has no cuda device" in res.stdout and "this needs a GPU" in res.stdout


# --- exit status: what ran, what was skipped ---------------------------------------------------------

def test_an_unavailable_named_backend_fails_before_running():
    res = run("check", "--backend", "triton", "--op", "causal_conv1d_step", env=plain_env())
    assert res.returncode == 2, res.stdout + res.stderr
    reason = registry.get("triton").available()  # not installed, or no GPU: whichever this machine says
    assert reason and f"skipped triton: unavailable here: {reason}\n" in res.stdout
    assert "--backend triton: unavailable here; nothing checked" in res.stdout
    assert "passed" not in res.stdout


def test_a_plain_check_names_the_backends_it_skips_and_logs_progress():
    res = run("check", "--op", "causal_conv1d_step", "--dtype", "float32", env=plain_env())
    assert res.returncode == 0, res.stdout + res.stderr
    # which backends this environment lacks depends on the extras installed: ask the registry
    skipped = [name for name, backend in registry.backends().items() if backend.available()]
    assert {"triton", "pallas", "ipex"} <= set(skipped)
    for name in skipped:
        reason = registry.get(name).available()
        assert f"skipped {name}: unavailable here: {reason}\n" in res.stdout
    # the torch backend implements the attention family only: its conv cases are unsupported, never passed
    unsupported = re.search(r"^torch causal_conv1d_step: (\d+) cases, 0 passed, 0 failed, \1 unsupported ", res.stdout,
                            re.M)
    assert unsupported, res.stdout
    assert re.search(rf"^\d+ passed, 0 failed, {unsupported[1]} unsupported; skipped \(unavailable here\): "
                     rf"{', '.join(skipped)}$", res.stdout, re.M)
    # not a terminal: one line per backend and op, with counts and the time so far, and no bar
    assert re.search(r"^reference causal_conv1d_step: (\d+) cases, \1 passed, 0 failed, 0 unsupported "
                     r"\(\1/\d+ done, \d+ s\)$", res.stdout, re.M)
    assert re.search(r"^cpu causal_conv1d_step: (\d+) cases, \1 passed", res.stdout, re.M)


@pytest.mark.parametrize("named, code", [(True, 2), (False, 0)])
def test_a_backend_that_runs_nothing(named, code):
    """cpu refuses float64: named, it checked nothing (2); in a plain check the reference still ran (0)."""
    args = ["--backend", "cpu"] if named else []
    res = run("check", *args, "--op", "causal_conv1d_step", "--dtype", "float64", env=plain_env())
    assert res.returncode == code, res.stdout + res.stderr
    assert ("nothing checked: cpu ran no case (every one unsupported)" in res.stdout) == named


class RunTimeRefusal(Mutant):
    """The reference, but float16 calls are refused when run, though its declared checks accept them."""

    def run(self, call):
        if call.dtype == torch.float16:
            raise NotSupported(self.name, call.op, "no float16 kernel after all")
        return super().run(call)


class DeclaredRefusal(Mutant):
    """The reference, but its declared checks refuse float16."""

    def supports(self, call):
        return "float16 is declared unsupported" if call.dtype == torch.float16 else super().supports(call)


@pytest.mark.parametrize("backend, strict, code", [
    (RunTimeRefusal("liar"), False, 0), (RunTimeRefusal("liar"), True, 1), (DeclaredRefusal("honest"), True, 0),
])
def test_strict_holds_a_backend_to_its_declared_support(backend, strict, code, monkeypatch, capsys):
    known = dict(registry.backends()) | {backend.name: backend}
    monkeypatch.setattr(registry, "backends", lambda: known)
    argv = ["check", "--backend", backend.name, "--op", "causal_conv1d_step", "--dtype", "float32",
            "--dtype", "float16", *(["--strict"] if strict else [])]
    assert cli.main(argv) == code
    out = capsys.readouterr().out
    strict_lines = re.findall(rf"^STRICT {backend.name} .*", out, re.M)
    n = len(cases.catalogue(cases.SMOKE, ["causal_conv1d_step"]))
    assert strict_lines == ([f"STRICT liar causal_conv1d_step [float16]: declared supported, yet no case ran "
                             f"({n} unsupported: no float16 kernel after all)"] if code else []), out
    assert re.search(r"^\d+ passed, 0 failed, \d+ unsupported", out, re.M)


def test_help_states_the_exit_rules():
    res = run("check", "--help")
    assert res.returncode == 0
    for text in ("exit status:", "--strict", "unavailable --backend", "ran no case", "--fuzz N"):
        assert text in res.stdout


@pytest.mark.parametrize("argv, message", [
    (["--seed", "3"], "--seed is for --fuzz"),
    (["--fuzz", "0"], "--fuzz: expected at least 1 example, got 0"),
    (["--fuzz", "2", "--tier", "full"], "--tier and --dtype do not apply"),
    (["--fuzz", "2", "--dtype", "float32"], "--tier and --dtype do not apply"),
])
def test_fuzz_option_errors(argv, message, capsys):
    assert cli.main(["check", "--backend", "reference", *argv]) == 2
    assert message in capsys.readouterr().out


def test_fuzz_replaces_the_catalogue(tmp_path):
    res = run("check", "--fuzz", "2", "--backend", "reference", "--op", "causal_conv1d_step",
              "--json", str(tmp_path / "r.json"), env=plain_env())
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["fuzz"] == 2 and len(data["results"]) == 2
    assert all(r["status"] == "pass" and r["op"] == "causal_conv1d_step" for r in data["results"])
    assert re.search(r"^reference causal_conv1d_step: 2 cases, 2 passed, 0 failed, 0 unsupported \(2/2 done",
                     res.stdout, re.M)


def test_fuzz_failures_fail_the_check(monkeypatch, capsys):
    known = dict(registry.backends()) | {"noisy": Mutant("noisy", after=_noisy)}
    monkeypatch.setattr(registry, "backends", lambda: known)
    assert cli.main(["check", "--fuzz", "2", "--backend", "noisy", "--op", "causal_conv1d_step", "--quiet"]) == 1
    assert re.search(r"^FAIL noisy causal_conv1d_step ", capsys.readouterr().out, re.M)


# --- output in a pipe: nothing cut, nothing eaten ----------------------------------------------------

def test_tables_in_a_pipe_are_as_wide_as_their_content(tmp_path):
    """COLUMNS unset, stdout a pipe: rich would squeeze to 80 columns; every cell must come out whole."""
    info = run("info", env=plain_env())
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    for name, backend in registry.backends().items():
        for text in (backend.description, backend.limits, backend.available()):
            assert not text or any(text in line for line in lines), (name, text)
    res = run("check", "--op", "causal_conv1d_step", "--dtype", "float64", "--json", str(tmp_path / "r.json"),
              env=plain_env())
    refused = {r["detail"] for r in json.loads((tmp_path / "r.json").read_text())["results"]
               if r["status"] == "unsupported"}
    assert refused and all(re.search(rf"│ {re.escape(why)} +│", res.stdout) for why in refused)  # padded to its column
    assert "…" not in info.stdout + res.stdout


class Bracketed(Backend):
    """A backend whose texts hold square brackets, as install hints do."""

    name, description, limits = "bracketed", "kernels [experimental]", "float64 [use reference]"

    def available(self):
        return "not installed (pip install 'portable-attn[cuda]')"


def test_markup_never_eats_literal_text(monkeypatch, capsys):
    known = dict(registry.backends()) | {"bracketed": Bracketed()}
    monkeypatch.setattr(registry, "backends", lambda: known)
    monkeypatch.setenv("PORTABLE_ATTN_BACKEND", "a[b]")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("no: not installed (pip install 'portable-attn[cuda]')", "kernels [experimental]",
                 "float64 [use reference]"):
        assert text in out
    assert re.search(r"PORTABLE_ATTN_BACKEND\s*│\s*a\[b\]\s*│", out)  # the environment table
    assert cli.main(["check", "--backend", "bracketed"]) == 2
    assert "skipped bracketed: unavailable here: not installed (pip install 'portable-attn[cuda]')" in \
        capsys.readouterr().out


# --- fallback logging ----------------------------------------------------------------------------------

def test_a_fallback_is_a_warning_shown_once_by_default():
    """No logging configured: WARNING reaches stderr; three identical calls, one line."""
    code = ("import torch, portable_attn as pa\n"
            "x, w = torch.randn(5, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)\n"
            "for _ in range(3):\n"
            "    pa.causal_conv1d(x, w)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=plain_env(PORTABLE_ATTN_BACKEND="cpu,reference"))
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "skips backend" in line]
    assert len(lines) == 1 and lines[0].startswith("portable_attn: causal_conv1d skips backend cpu: "), res.stderr
    assert "float64" in lines[0]
