"""Render the README's support matrix from conformance JSON reports (never typed by hand).

    python ci/support_matrix.py --write README.md reports/*.json   # rewrite the block
    python ci/support_matrix.py --check README.md reports/*.json   # fail if the README is stale
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from portable_attn import registry
from portable_attn.conformance import report

START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


def render(paths: list[str]) -> str:
    results = [r for p in paths for r in report.from_json(pathlib.Path(p).read_text())]
    return report.markdown(results, registry.implementation_notes())


def replace_block(text: str, block: str) -> str:
    head, sep, rest = text.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README has no {START} ... {END} block")
    return f"{head}{START}\n{block}{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    p.add_argument("readme")
    p.add_argument("reports", nargs="+")
    args = p.parse_args(argv)
    path = pathlib.Path(args.readme)
    text = path.read_text()
    new = replace_block(text, render(args.reports))
    if args.write:
        path.write_text(new)
        return 0
    if new != text:
        print(f"{path}: the support matrix is stale; run python ci/support_matrix.py --write {path} "
              f"{' '.join(args.reports)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
