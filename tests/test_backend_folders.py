"""Every built-in backend is a folder of one shape: `__init__.py` declares it, `ops.py` holds one function per
op it implements, `support.py` its per-input reasons (where it refuses inputs), kernel files named by role."""
import importlib.util
import pathlib

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


def test_role_names_are_shared():
    """A role has one file name in every backend that has that role."""
    for folder in BACKENDS.iterdir():
        if not (folder / "__init__.py").exists() or folder.name == "__pycache__":
            continue
        names = {p.stem for p in folder.glob("*.py")}
        assert not names & {"chunked", "state", "recurrent_states"}, f"{folder.name}: use chunk.py / states.py"
