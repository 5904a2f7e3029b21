#!/usr/bin/env python3
"""The conformance matrix (matrix.yaml): check it, show it, hand it to GitHub Actions, run it here.

    python ci/matrix.py validate                 schema, images, extras; exit 1 on any error
    python ci/matrix.py list                     every entry, planned ones included
    python ci/matrix.py gha [--devices cpu,...]  the GitHub Actions matrix of the ready entries
    python ci/matrix.py run [--here] [--name N] [--skip N]  `portable-attn check --strict` for each ready entry

Every command validates first. Needs Python >= 3.11 (tomllib) and PyYAML; `run` needs the package.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "matrix.yaml"

DEVICES = ("cpu", "cuda", "rocm", "xpu", "tpu")
CHOICES = {
    "device": DEVICES,
    "backend": ("reference", "cpu", "triton", "pallas", "torch", "ipex", "onnxruntime"),
    "tier": ("smoke", "full"),
    "status": ("ready", "planned"),
}
FIELDS = {  # required field -> the YAML type it must have
    "name": str, "device": str, "backend": str, "image": str, "runner": (str, list), "env": dict,
    "tier": str, "allow_failure": bool, "status": str, "extras": list,
}
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # safe as a file name, docker tag and artifact name
ENV_KEY = re.compile(r"[A-Z_][A-Z0-9_]*")

# What `docker run` needs to reach each device's accelerator (emitted into the GitHub matrix).
DOCKER_ARGS = {
    "cpu": "",
    "cuda": "--gpus all",
    "rocm": "--device /dev/kfd --device /dev/dri --group-add video --security-opt seccomp=unconfined",
    "xpu": "--device /dev/dri",
    "tpu": "--privileged --net host",
}


def load(path: Path = MATRIX) -> dict:
    return yaml.safe_load(Path(path).read_text())


def pyproject_extras(root: Path = ROOT) -> set[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", list: "a list", dict: "a mapping", bool: "true/false"}[k] for k in kinds)


def validate(doc, root: Path = ROOT) -> list[str]:
    """Every problem with the matrix, as messages; an empty list means it is valid."""
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list) or not doc["entries"]:
        return ["expected a mapping with a non-empty `entries:` list"]
    extras, names, errors = pyproject_extras(root), set(), []
    for i, e in enumerate(doc["entries"]):
        if not isinstance(e, dict):
            errors.append(f"entry {i}: expected a mapping")
            continue

        def err(msg: str, where: str = f"entry {e.get('name', i)}") -> None:
            errors.append(f"{where}: {msg}")

        for field, kind in FIELDS.items():
            if field not in e:
                err(f"missing field `{field}`")
            elif not isinstance(e[field], kind):
                err(f"`{field}` must be {_type_name(kind)}")
        for field in sorted(e.keys() - FIELDS.keys() - {"issue"}):
            err(f"unknown field `{field}`")
        for field, allowed in CHOICES.items():
            if isinstance(e.get(field), str) and e[field] not in allowed:
                err(f"{field} `{e[field]}` is not one of {', '.join(allowed)}")

        name, device, image = e.get("name"), e.get("device"), e.get("image")
        if isinstance(name, str):
            if not NAME.fullmatch(name):
                err("name must be lower-case letters, digits, `.`, `_` or `-`")
            if name in names:
                err("duplicate name")
            names.add(name)
        if isinstance(image, str):
            if device in DEVICES and image != f"Dockerfiles/Dockerfile.{device}":
                err(f"image must be Dockerfiles/Dockerfile.{device}")
            if not (root / image).is_file():
                err(f"image {image} does not exist")
        runner = e.get("runner")
        if isinstance(runner, list) and not (runner and all(isinstance(r, str) and r for r in runner)):
            err("runner must be a non-empty list of labels")
        if device in DEVICES and device != "cpu" and not (isinstance(runner, list) and "self-hosted" in runner):
            err(f"{device} entries run on self-hosted runners: runner must list `self-hosted`")
        env, wanted = e.get("env"), e.get("extras")
        for key, value in (env.items() if isinstance(env, dict) else ()):
            if not (isinstance(key, str) and ENV_KEY.fullmatch(key)) or not isinstance(value, str):
                err(f"env {key}: names are upper-case identifiers and values are strings (quote them)")
        for extra in (wanted if isinstance(wanted, list) else ()):
            if not isinstance(extra, str) or extra not in extras:
                err(f"extra `{extra}` is not in pyproject.toml's optional-dependencies")

        issue = e.get("issue")
        if e.get("status") == "planned" and not (
            (isinstance(issue, int) and not isinstance(issue, bool) and issue > 0) or issue == "unfiled"
        ):
            err("a planned entry names the issue that builds it (`issue: N`, or `issue: unfiled`)")
        if e.get("status") == "ready" and "issue" in e:
            err("a ready entry has no `issue`")
    if not errors and not any(e["status"] == "ready" for e in doc["entries"]):
        errors.append("no ready entries: the GitHub matrix would be empty")
    return errors


def entry_env(e: dict) -> dict[str, str]:
    """The environment an entry runs with: its platform, then its own variables."""
    return {"PORTABLE_ATTN_PLATFORM": e["device"], **e["env"]}


def status_of(e: dict) -> str:
    if e["status"] == "ready":
        return "ready"
    return f"planned (#{e['issue']})" if isinstance(e["issue"], int) else f"planned ({e['issue']})"


def gha(doc: dict, devices=DEVICES) -> dict:
    """The `strategy.matrix` of .github/workflows/conformance.yml: one object per ready entry."""
    keys = ("name", "device", "backend", "runner", "image", "tier", "allow_failure")
    return {"include": [
        {**{k: e[k] for k in keys}, "env": entry_env(e), "docker_args": DOCKER_ARGS[e["device"]]}
        for e in doc["entries"] if e["status"] == "ready" and e["device"] in devices
    ]}


def table(doc: dict) -> str:
    rows = [("NAME", "DEVICE", "BACKEND", "TIER", "STATUS", "MAY FAIL", "RUNNER", "EXTRAS")]
    for e in doc["entries"]:
        runner = e["runner"] if isinstance(e["runner"], str) else ",".join(e["runner"])
        rows.append((e["name"], e["device"], e["backend"], e["tier"], status_of(e),
                     "yes" if e["allow_failure"] else "no", runner, ",".join(e["extras"]) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def devices_here() -> set[str]:
    """Devices on this machine, by the library's probe (no device context is created)."""
    from portable_attn.platforms import machine_platforms

    return {p.value for p in machine_platforms()} | {"cpu"}


def check_command() -> list[str]:
    """`portable-attn check`, preferring the script beside this interpreter (an unactivated venv)."""
    script = Path(sys.executable).with_name("portable-attn")
    return [str(script) if script.exists() else "portable-attn", "check"]


def run(entries: list[dict], *, here: bool = False, reports: Path = Path("reports"),
        check: list[str] | None = None, jobs: int = 1) -> int:
    """Run `check` for each ready entry (with --here: each whose device is present), `jobs` at a time
    (each entry's output then goes to reports/<name>.log, printed when it ends); 1 if one that may not
    fail failed. Planned entries are reported as planned, never run."""
    check = check or check_command()
    present = devices_here() if here else set(DEVICES)
    outcomes = {}
    runnable = []
    for e in entries:
        if e["status"] == "planned":
            outcomes[e["name"]] = status_of(e) + ": not built yet"
        elif e["device"] not in present:
            outcomes[e["name"]] = f"skipped: no {e['device']} device here"
        else:
            runnable.append(e)
    if runnable:
        reports.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        codes = dict(zip((e["name"] for e in runnable),
                         pool.map(lambda e: _run_entry(e, check, reports, logged=jobs > 1), runnable)))
    failed = False
    for e in runnable:
        rc = codes[e["name"]]
        if rc == 0:
            outcomes[e["name"]] = "passed"
        elif e["allow_failure"]:
            outcomes[e["name"]] = f"FAILED (exit {rc}), allowed to fail"
        else:
            outcomes[e["name"]] = f"FAILED (exit {rc})"
            failed = True
    width = max((len(name) for name in outcomes), default=0)
    print("\n".join(f"{e['name'].ljust(width)}  {outcomes[e['name']]}" for e in entries))
    return 1 if failed else 0


def _run_entry(e: dict, check: list[str], reports: Path, logged: bool) -> int:
    """One entry's check; its output to the terminal, or (logged) to reports/<name>.log, shown at the end."""
    # --strict: the entry's backend must be available and run every case its own checks declare supported
    cmd = [*check, "--backend", e["backend"], "--tier", e["tier"], "--strict",
           "--junit", str(reports / f"{e['name']}.xml"), "--json", str(reports / f"{e['name']}.json")]
    env = entry_env(e)
    header = f"== {e['name']}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}"
    log = reports / f"{e['name']}.log"
    try:
        if not logged:
            print(header, flush=True)
            return subprocess.run(cmd, env={**os.environ, **env}).returncode
        with open(log, "w") as out:
            rc = subprocess.run([*cmd, "--quiet"], env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT).returncode
        print(header + "\n" + log.read_text(), flush=True)
        return rc
    except OSError as exc:
        print(f"cannot run {cmd[0]}: {exc}", file=sys.stderr)
        return 127


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ci/matrix.py", description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=Path, default=MATRIX, help="default: matrix.yaml at the repo root")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("validate", help="check the schema, the images and the extras")
    sub.add_parser("list", help="a table of every entry, planned ones included")
    p_gha = sub.add_parser("gha", help="print the GitHub Actions matrix JSON of the ready entries")
    p_gha.add_argument("--devices", default=",".join(DEVICES), help="comma-separated; default: all")
    p_run = sub.add_parser("run", help="run `portable-attn check` for ready entries")
    p_run.add_argument("--here", action="store_true", help="only entries whose device this machine has")
    p_run.add_argument("--name", action="append", help="this entry only (repeatable)")
    p_run.add_argument("--skip", action="append", default=[],
                       help="not this entry (repeatable): one run from another environment (cpu-ipex)")
    p_run.add_argument("--reports", type=Path, default=Path("reports"), help="JUnit/JSON folder")
    p_run.add_argument("--jobs", type=int, default=1, help="entries run at a time (default 1)")
    args = parser.parse_args(argv)

    try:
        doc = load(args.matrix)
    except (OSError, yaml.YAMLError) as exc:
        print(f"{args.matrix}: {exc}", file=sys.stderr)
        return 1
    errors = validate(doc)
    if errors:
        print("\n".join(f"{args.matrix}: {msg}" for msg in errors), file=sys.stderr)
        return 1

    entries = doc["entries"]
    if args.command == "validate":
        ready = sum(e["status"] == "ready" for e in entries)
        print(f"{args.matrix}: {len(entries)} entries ({ready} ready, {len(entries) - ready} planned), valid")
    elif args.command == "list":
        print(table(doc))
    elif args.command == "gha":
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if unknown := set(devices) - set(DEVICES):
            parser.error(f"unknown device(s) {', '.join(sorted(unknown))}; expected {', '.join(DEVICES)}")
        plan = gha(doc, devices)
        if not plan["include"]:  # GitHub rejects an empty matrix with a less helpful message
            print(f"{args.matrix}: no ready entries for devices {args.devices!r}", file=sys.stderr)
            return 1
        print(json.dumps(plan, separators=(",", ":")))
    elif args.command == "run":
        if args.name:
            if unknown := set(args.name) - {e["name"] for e in entries}:
                parser.error(f"unknown entry {', '.join(sorted(unknown))}; see `ci/matrix.py list`")
            entries = [e for e in entries if e["name"] in args.name]
        if unknown := set(args.skip) - {e["name"] for e in entries}:
            parser.error(f"--skip: unknown entry {', '.join(sorted(unknown))}; see `ci/matrix.py list`")
        entries = [e for e in entries if e["name"] not in args.skip]
        return run(entries, here=args.here, reports=args.reports, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
