"""`portable-attn info` and `check` as a user runs them."""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from portable_attn import cli, registry
from tests.conformance.test_suite_catches import Mutant, _noisy

CLI = [sys.executable, "-m", "portable_attn.cli"]


def run(*args, env=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=600)


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
    assert "FAIL noisy causal_conv1d_step" in capsys.readouterr().out


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
