"""Check, select, run: the one path every call takes (the torch ops, their torch.library ops, the JAX front).

A call whose signature passed before replays its checks and, where the choice is a function of the
signature, its backend (checkmemo.py): the host cost of a decode step is a dict lookup, not the rules."""
from __future__ import annotations

from . import checkmemo, registry
from .backend import Call
from .optable import OPS
from .platforms import platform_of


def _bound(decl, args: dict) -> dict:
    """`args` with the op's defaults filled in; an unknown or missing name raises TypeError."""
    a = dict(decl.defaults)
    a.update(args)
    if len(a) != len(decl.args):  # a name the op does not take, or a required one missing
        unknown = sorted(a.keys() - set(decl.names))
        missing = [n for n in decl.required if n not in a]
        raise TypeError(f"{decl.name}() got an unexpected keyword argument {unknown[0]!r}" if unknown
                        else f"{decl.name}() missing required argument {missing[0]!r}")
    return a


def make_call(op: str, args: dict) -> Call:
    """Check `args` (the op's arguments by name; omitted ones take their defaults) and wrap them as a Call."""
    decl = OPS[op]
    a = _bound(decl, args)
    key = checkmemo.signature(decl, a)
    a = checkmemo.check(decl, a, key, checkmemo.lookup(key))
    return Call(op, a, platform_of(a[decl.primary]))


def run(op: str, args: dict, backend=None):
    """The op's result: `args` (omitted ones take their defaults) checked, the backend selected
    (`backend=`, env, platform default), run."""
    decl = OPS[op]
    return run_bound(decl, _bound(decl, args), backend)


def run_bound(decl, a: dict, backend=None):
    """`run` of a dict holding every argument of op `decl` by name (a public function's locals)."""
    op = decl.name
    key = checkmemo.signature(decl, a, backend)
    passed = checkmemo.lookup(key)
    a = checkmemo.check(decl, a, key, passed)
    if passed is not None and passed.run is not None:  # Backend.run, on the backend chosen before
        return passed.run(**a)
    call = Call(op, a, platform_of(a[decl.primary]))
    chosen = registry.select(call, backend)
    if key is not None and checkmemo.keeps_choice(chosen) and registry.first_choice(call, backend) == chosen.name:
        checkmemo.remember_backend(key, chosen)
    return chosen.run(call)
