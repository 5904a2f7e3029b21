"""The core's modules import each other without circles (lazy imports inside functions included)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "portable_attn"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> set:
    """portable_attn modules `path` imports anywhere in its body (`from . import x` counts as x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("portable_attn"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("portable_attn"))
    return found


def test_no_import_cycles_in_the_core():
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {name: {m for m in _imports(path, name) if m in files and m != name} for name, path in files.items()}
    # a package's __init__ re-exporting its modules is not a circle of logic: leave package nodes out
    packages = {n for n, p in files.items() if p.name == "__init__.py"}
    graph = {n: deps - packages for n, deps in graph.items() if n not in packages}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
