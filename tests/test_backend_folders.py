"""Every built-in backend is a folder of one shape: `__init__.py` declares it, `ops.py` holds one function per
op it implements, `support.py` its per-input reasons (where it refuses inputs), kernel files named by role."""
import importlib.util
import pathlib
import tomllib

import pytest

from portable_attn import registry

BACKENDS = pathlib.Path(__file__).resolve().parents[1] / "backends"


@pytest.mark.parametrize("name", sorted(registry.BUILTIN))
def test_backend_folder_shape(name):
    folder = BACKENDS / name
    backend = registry.get(name)
    assert registry.BUILTIN[name] == f"portable_attn.backends.{name}:BACKEND"
    assert (folder / "__init__.py").exists() and backend.module == f"portable_attn.backends.{name}.ops"
    assert (folder / "support.py").exists() == bool(backend.support)
    if backend.support:
        assert backend.support == f"portable_attn.backends.{name}.support"
    if backend.array == "torch" or (folder / "ops.py").exists():
        ops = importlib.util.find_spec(backend.module)
        assert ops is not None and pathlib.Path(ops.origin) == folder / "ops.py"


def test_every_package_ships_in_the_wheel():
    """The wheel holds the packages pyproject lists (editable installs find the rest anyway): every folder
    with an __init__.py under portable_attn/ and backends/ is one of them."""
    root = BACKENDS.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"portable_attn" + "".join(f".{part}" for part in p.parent.relative_to(root / "portable_attn").parts)
             for p in (root / "portable_attn").rglob("__init__.py")}
    found |= {"portable_attn.backends" + "".join(f".{part}" for part in p.parent.relative_to(BACKENDS).parts)
              for p in BACKENDS.rglob("__init__.py")}
    assert found - listed == set(), "add them to [tool.setuptools] packages in pyproject.toml"


def test_role_names_are_shared():
    """A role has one file name in every backend that has that role."""
    for folder in BACKENDS.iterdir():
        if not (folder / "__init__.py").exists() or folder.name == "__pycache__":
            continue
        names = {p.stem for p in folder.glob("*.py")}
        assert not names & {"chunked", "state", "recurrent_states"}, f"{folder.name}: use chunk.py / states.py"
