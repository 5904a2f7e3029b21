"""Check, select, run: the one path every call takes (the torch ops, their torch.library ops, the JAX front)."""
from __future__ import annotations

from . import registry
from .backend import Call
from .optable import OPS
from .platforms import platform_of


def make_call(op: str, args: dict) -> Call:
    """Check `args` (the op's arguments by name; omitted ones take their defaults) and wrap them as a Call."""
    decl = OPS[op]
    a = dict(decl.defaults)
    a.update(args)
    if len(a) != len(decl.args):  # a name the op does not take, or a required one missing
        unknown = sorted(a.keys() - set(decl.names))
        missing = [n for n in decl.required if n not in a]
        raise TypeError(f"{op}() got an unexpected keyword argument {unknown[0]!r}" if unknown
                        else f"{op}() missing required argument {missing[0]!r}")
    a = decl.check(a)
    return Call(op, a, platform_of(a[decl.primary]))


def run(op: str, args: dict, backend=None):
    """The op's result: `args` checked, the backend selected (`backend=`, env, platform default), run."""
    call = make_call(op, args)
    return registry.select(call, backend).run(call)
