"""Check, select, run: the one path every call takes (the torch ops, their torch.library ops, the JAX front).

A call whose signature passed before replays its checks and, where the choice is a function of the
signature, its backend (checkmemo.py): the host cost of a decode step is a dict lookup, not the rules."""
from __future__ import annotations

import torch

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
    (`backend=`, env, platform default), run: the public op's own path."""
    return _ENTRIES[op](**args, backend=backend)


def _run(decl, a: dict, backend, key, passed):
    """A call that is not a remembered choice: checks (replayed from `passed` where it is not None), the
    backend selected, the choice remembered under `key` where it is a function of it, run."""
    a = checkmemo.check(decl, a, key, passed)
    call = Call(decl.name, a, platform_of(a[decl.primary]))
    chosen = registry.select(call, backend)
    if key is not None and checkmemo.keeps_choice(chosen) and registry.first_choice(call, backend) == chosen.name:
        checkmemo.remember_backend(key, chosen)
    return chosen.run(call)


_ENTRIES: dict = {}  # op name -> its public function


def entry(fn, compiled):
    """The public op declared as `fn` (its name, signature and docstring; its body is not run), generated
    from the op table: under torch.compile `compiled(op, args)` (one custom op, library.compiled); a call
    whose signature passed before on a kept backend (checkmemo.py) its signature's items and its tensors
    checked against the last such call's (checkmemo.FAST), else its whole signature (`_signed`), then the
    replayed checks and the backend's function, no other Python between; any other call `_run`. Helper
    names start with `_` (no argument's name does)."""
    decl = OPS[fn.__name__]
    positional = [a.name for a in decl.args if not a.keyword]  # the declaration lists them first
    keyword = [a.name for a in decl.args if a.keyword]
    args = ", ".join(f"{n!r}: {n}" for n in decl.names)
    tensors = checkmemo.tensors_source(decl)
    names = ", ".join(decl.names)
    run = [f"        _a = {{{args}, **_passed.normalised}}",  # Backend.run, on the backend chosen before
           "        return _passed.run(**(_a if _passed.plain else _replay(_decl, _a, _passed)))"]
    source = "\n".join([
        f"def {decl.name}({', '.join(positional + ['*'] + keyword + ['backend'])}):",
        "    if _is_dynamo_compiling():  # dynamo records one custom op; the dispatch below runs inside it",
        f"        return _compiled({decl.name!r}, {{{args}, 'backend': backend}})",
        *checkmemo.items_source(decl),
        "    try:",
        "        _fast = _FAST.get(_items)",
        "    except TypeError:  # an unhashable argument: never remembered",
        "        _fast = None",
        f"    if _fast is not None and _fast.check({tensors}):  # tensors like the last call's of these items",
        "        _n = _fast.normalised",
        "        if _n is not None:  # nothing to replay: the backend's function, no dict of the arguments",
        f"            return _fast.run({checkmemo.fast_call_source(decl)})",
        "        _passed = _fast.passed",
        *run,
        f"    return _signed({names}, backend, _items)",
        "",
        "",
        f"def _signed({names}, backend, _items):  # a call FAST does not answer: its whole signature",
        *checkmemo.key_source(decl),
        "    try:",
        "        _passed = _PASSED.get(_key)",
        "    except TypeError:  # an unhashable argument: never remembered",
        "        _passed = None",
        "    if _passed is not None and _passed.run is not None:",
        f"        _keep(_items, _key, _passed, {checkmemo.replaceable(decl)!r}, {tensors})",
        *run,
        "    if _is_compiling():  # export, or a compile session outside dynamo's trace (fake tensors: no key passed)",
        f"        return _compiled({decl.name!r}, {{{args}, 'backend': backend}})",
        f"    return _run(_decl, {{{args}}}, backend, _key, _passed)",
    ])
    scope = dict(checkmemo.SCOPE, _is_compiling=torch.compiler.is_compiling, _compiled=compiled,
                 _is_dynamo_compiling=getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling),
                 _PASSED=checkmemo.PASSED, _FAST=checkmemo.FAST, _keep=checkmemo.keep, _replay=checkmemo.replay,
                 _run=_run, _decl=decl)
    exec(source, scope)  # noqa: S102 - source built above from the op table, nothing from a caller
    public = scope[decl.name]
    public.__defaults__, public.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
    public.__doc__, public.__module__, public.__qualname__ = fn.__doc__, fn.__module__, fn.__qualname__
    _ENTRIES[decl.name] = public
    return public
