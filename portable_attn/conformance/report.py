"""Conformance results as a terminal table, JSON, JUnit XML and the Markdown support matrix."""
from __future__ import annotations

import collections
import dataclasses
import json
import xml.etree.ElementTree as ET

from rich.markup import escape
from rich.table import Table

from ..optable import NAMES as OPS
from .runner import Result

STATUS_ORDER = ("fail", "error", "pass", "unsupported")


def cells(results: list[Result]) -> dict[tuple[str, str, str], list[Result]]:
    """Results grouped by (backend, op, dtype), in op order."""
    grouped = collections.defaultdict(list)
    for r in results:
        grouped[(r.backend, r.op, r.dtype)].append(r)
    return dict(sorted(grouped.items(), key=lambda kv: (kv[0][0], OPS.index(kv[0][1]), kv[0][2])))


def summarise(group: list[Result]) -> tuple[str, str]:
    """(status, text) of one cell: fail beats unsupported beats pass; unsupported never counts as pass."""
    by = collections.Counter(r.status for r in group)
    ran = by["pass"] + by["fail"] + by["error"]
    if by["fail"] or by["error"]:
        worst = next(r for r in group if r.status in ("fail", "error"))
        return "fail", f"{by['fail'] + by['error']}/{ran} failed ({worst.case}: {worst.detail})"
    if by["unsupported"] and not by["pass"]:
        return "unsupported", group[0].detail
    text = f"{by['pass']}/{ran} passed"
    if by["unsupported"]:
        text += f", {by['unsupported']} unsupported"
    return "pass", text


def table(results: list[Result]) -> Table:
    dtypes = sorted({r.dtype for r in results}, key=["float32", "float16", "bfloat16", "float64"].index)
    t = Table(title="portable-attn conformance", show_lines=False)
    t.add_column("backend", no_wrap=True)
    t.add_column("op", no_wrap=True)
    for d in dtypes:
        t.add_column(d)
    rows = collections.OrderedDict()
    for (backend, op, dtype), group in cells(results).items():
        rows.setdefault((backend, op), {})[dtype] = summarise(group)
    style = {"pass": "green", "fail": "bold red", "unsupported": "yellow"}
    for (backend, op), row in rows.items():
        t.add_row(escape(backend), op, *(f"[{style[row[d][0]]}]{escape(row[d][1])}[/]" if d in row else ""
                                         for d in dtypes))
    return t


def failed(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status in ("fail", "error")]


def to_json(results: list[Result], meta: dict) -> str:
    return json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1)


def from_json(text: str) -> list[Result]:
    return [Result(**r) for r in json.loads(text)["results"]]


def to_junit(results: list[Result]) -> str:
    root = ET.Element("testsuites", name="portable-attn conformance")
    by_backend = collections.defaultdict(list)
    for r in results:
        by_backend[r.backend].append(r)
    for backend, rs in by_backend.items():
        suite = ET.SubElement(root, "testsuite", name=backend, tests=str(len(rs)),
                              failures=str(len(failed(rs))), skipped=str(sum(r.status == "unsupported" for r in rs)),
                              time=f"{sum(r.seconds for r in rs):.3f}")
        for r in rs:
            tc = ET.SubElement(suite, "testcase", classname=f"{backend}.{r.op}", name=f"{r.case}[{r.dtype}]",
                               time=f"{r.seconds:.3f}")
            if r.status in ("fail", "error"):
                ET.SubElement(tc, "failure", message=r.detail).text = f"err={r.err} tol={r.tol}"
            elif r.status == "unsupported":
                ET.SubElement(tc, "skipped", message=f"unsupported: {r.detail}")
    return ET.tostring(root, encoding="unicode")


def markdown(results: list[Result], notes: dict | None = None) -> str:
    """The support matrix for the docs: op x backend, with the dtypes that passed, the reasons of the
    cases a backend refused beside them, and `notes[(backend, op)]` (how it is implemented) where given."""
    backends = sorted({r.backend for r in results})
    lines = ["| op | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    ops = [op for op in OPS if any(r.op == op for r in results)]
    grouped = cells(results)
    for op in ops:
        row = []
        for b in backends:
            per = {d: summarise(g) for (bb, o, d), g in grouped.items() if bb == b and o == op}
            passed = [d for d, (s, _) in per.items() if s == "pass"]
            if any(s == "fail" for s, _ in per.values()):
                cell = "fails: " + ", ".join(d for d, (s, _) in per.items() if s == "fail")
            elif passed:
                refused = dict.fromkeys(r.detail for r in results
                                        if (r.backend, r.op) == (b, op) and r.status == "unsupported")
                cell = "yes (" + ", ".join(passed) + ")" + "".join(f"; not: {why}" for why in refused)
            elif per:
                cell = "no: " + next(iter(per.values()))[1]
            else:
                cell = ""
            note = (notes or {}).get((b, op))
            row.append(f"{cell} [{note}]" if cell and note else cell)
        lines.append(f"| `{op}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
