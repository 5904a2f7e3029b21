"""What a run shows and writes: rich tables, the case list, the JSON file."""
from __future__ import annotations

import json
import pathlib

from rich.markup import escape
from rich.table import Table

from . import host
from .cases import Case

STATUS_STYLE = {"ok": "green", "skipped": "yellow", "unsupported": "yellow", "unavailable": "yellow", "error": "red"}


def case_list(catalogue: dict[str, Case]) -> Table:
    t = Table(title="benchmark cases")
    t.add_column("case", no_wrap=True, min_width=max(len(n) for n in catalogue))
    for col in ("op", "pattern", "points", "sizes", "baseline", "peers"):
        t.add_column(col)
    for c in catalogue.values():
        fixed = {k: v for k, v in c.points[0].sizes.items() if k != c.axis}
        cells = (c.name, c.op, c.pattern, f"{c.axis} = {', '.join(str(p.x) for p in c.points)}",
                 " ".join(f"{k}={v}" for k, v in fixed.items()), c.baseline or "—", ", ".join(c.peers) or "—")
        t.add_row(*map(escape, cells))
    return t


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _ms(seconds) -> str:
    return "—" if seconds is None else format(1e3 * seconds, ".0f" if seconds >= 0.1 else ".3g")


def _grid(case: dict) -> tuple[list[str], list[tuple[list[str], str, bool]]]:
    """Column names and rows (cells, status, last row of its point) of one case's table."""
    moved = any(p["bytes"] for p in case["points"])
    frac = any(e.get("bw_frac") is not None for p in case["points"] for e in p["impls"])
    base = case["baseline"]
    counts = sorted({p.get("threads") for p in case["points"]} - {None})
    multi = len(counts) > 1
    cols = [case["axis"], *(["threads"] if multi else []), "impl", "median ms", "min ms", "IQR ms", "GFLOP/s", *(["GB/s"] if moved else []),
            *(["% BW"] if frac else []), "peak MB", "setup s", *([f"vs {base}"] if base else []),
            *([f"x of {counts[0]} thread{'s' * (counts[0] > 1)}"] if multi else []), "note"]
    rows = []
    for point in case["points"]:
        for i, e in enumerate(point["impls"]):
            mem = e.get("peak_mem_bytes")
            status = "" if e["status"] == "ok" else f"{e['status']}: "
            note = e["reason"] if status else e.get("peak_mem_note") or ""
            bw = None if e.get("bw_frac") is None else 100 * e["bw_frac"]
            rows.append(([str(point["x"]) if i == 0 else "",
                          *([str(point["threads"]) if i == 0 else ""] if multi else []), e["name"],
                          _ms(e.get("median_s")), _ms(e.get("min_s")), _ms(e.get("iqr_s")),
                          _num(e.get("gflops"), ".3g"), *([_num(e.get("gbps"), ".3g")] if moved else []),
                          *([_num(bw, ".0f")] if frac else []),
                          _num(None if mem is None else mem / 2**20, ".0f"), _num(e.get("setup_s"), ".2f"),
                          *([_num(e.get("ratio"), ".2f")] if base else []),
                          *([_num(e.get("scaling"), ".2f")] if multi else []), f"{status}{note}"],
                         e["status"], i == len(point["impls"]) - 1))
    return cols, rows


def _caption(case: dict) -> str:
    if case["baseline"] is None:
        return "no peer to compare with"
    return f"vs {case['baseline']}: its median / this median (> 1: faster)"


def bandwidth_line(results: dict) -> str | None:
    """The measured bandwidth that `% BW` is a fraction of, or None when no case moved counted bytes."""
    bw = results.get("bandwidth")
    if bw is None:
        return None
    return (f"Measured bandwidth: {bw['gbps']:.4g} GB/s (a {bw['bytes'] / 2 / 2**20:.0f} MiB device-to-device "
            f"copy, bytes read + written / median of {bw['repeat']}); % BW is GB/s as a share of it.")


def matmul_line(results: dict) -> str | None:
    """The matrix-product rates measured in the run, or None (not measured on this device)."""
    mm = results["machine"].get("matmul")
    if not mm:
        return None
    parts = [f"{dtype} ({mm['size'][dtype]} x {mm['size'][dtype]}) "
             + ", ".join(f"{r:.0f} GFLOP/s at {n} thread{'s' * (n != '1')}" for n, r in by.items())
             for dtype, by in mm["gflops"].items()]
    return "Matrix products (torch.mm, median of 5): " + "; ".join(parts) + "."


def tables(results: dict) -> list[Table]:
    out = []
    for case in results["cases"]:
        if case.get("kind") == host.NAME:
            out.append(host.table(case, STATUS_STYLE))
            continue
        cols, rows = _grid(case)
        t = Table(title=escape(f"{case['name']}: {case['op']}, {case['pattern']}"), caption=escape(_caption(case)))
        for col in cols:
            t.add_column(col, justify="left" if col in (case["axis"], "threads", "impl", "note") else "right",
                         no_wrap=col != "note")
        for cells, status, last in rows:
            t.add_row(*map(escape, cells[:-1]), f"[{STATUS_STYLE[status]}]{escape(cells[-1])}[/]", end_section=last)
        out.append(t)
    return out


def markdown(results: dict) -> str:
    """The same tables in Markdown, headed by the machine they ran on (for BENCHMARKS.md)."""
    m = results["machine"]
    gpu = f" ({m['gpu']})" if m.get("gpu") else ""
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}{gpu}, {m['date']}.",
             *([bandwidth_line(results)] if results.get("bandwidth") else []),
             *([matmul_line(results)] if results["machine"].get("matmul") else []), ""]
    for case in results["cases"]:
        if case.get("kind") == host.NAME:
            lines += host.markdown(case)
            continue
        cols, rows = _grid(case)
        lines += [f"**{case['name']}**: {case['op']}, {case['pattern']} ({_caption(case)})", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells, _, _ in rows]
        lines.append("")
    return "\n".join(lines)


def write_json(results: dict, out_dir: pathlib.Path) -> pathlib.Path:
    path = out_dir / "bench.json"
    path.write_text(json.dumps(results, indent=1))
    (out_dir / "bench.md").write_text(markdown(results))
    return path
