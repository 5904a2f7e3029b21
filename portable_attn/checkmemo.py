"""A call's checks and backend choice, remembered by its signature: the host cost of a decode step.

checks.py's rules read, of each tensor, its type, shape, dtype and device, and of each other argument
its type and value; beyond those only index *values* and, for `out`, the memory it spans. So a call
whose signature (those fields of every argument) matches one that passed its checks passes them too,
with the same normalised arguments: a hit replays them (scales, windows, the default `state_indices`)
and runs only what a signature cannot hold, the `out` overlap check. Each op's signature is two tuple
expressions generated from its declaration (`_keyer`): a decode step makes dozens of calls. A call whose
index values are checked (an index tensor given and `checks.index_checks_enabled()`) is replayed too
where its op declares those checks on their own (`Op.values`), which then run on every call; otherwise
it takes the full checks, as do calls with a BlockMask and calls whose signature is not hashable.

A signature is its *items* (the arguments that are not tensors, the tensors' types, the environment) and its
tensors' shapes, dtypes and devices (with grad mode and their requires_grad flags). Reading the metadata of a
step's 6-10 tensors is most of a remembered call's cost where its kernel left the caches cold, so a call whose
items match one remembered with its backend's function checks its tensors against that call's with torch's C++
guard (`FAST`): one C++ call instead of the signature.

The backend chosen for a signature is kept too where the choice is a function of it: the signature
then also holds `backend=`, the environment variables selection reads, grad mode and, where it is on,
each tensor's requires_grad, and the backend is one whose refusals are all the base class's (no `support` module,
no availability probe), chosen without a fallback.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

try:
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # a torch without dynamo's guards: every call computes its signature
    TensorGuards = None

from . import checks, envs
from .backend import Backend

# Arguments whose values (not only shapes) the checks read when index checks are enabled.
INDEX_ARGS = frozenset({"cu_seqlens_q", "cu_seqlens_k", "cu_seqlens", "block_table", "seqused_k", "slot_mapping",
                        "indices", "state_indices"})
TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # exact types: a subclass (fake, functional) is not remembered
PLAIN = (bool, int, str, float)  # the values a remembered call's non-tensor arguments may hold
# Host ints the checks read only as >= 0 and against index values (checked per call): keyed by their sign,
# so that a decode step's growing max_seqlen_k keeps its signature.
HINTS = frozenset({"max_seqlen_q", "max_seqlen_k"})
CHECK_VAR = "PORTABLE_ATTN_CHECK"  # off: no index values checked (read first without a call: a decode step's checks)
# The variables selection reads, each with the condition under which it does (registry._candidates: the default
# backends only where the call names none).
SELECTION_VARS = (("PORTABLE_ATTN_BACKEND", "backend is None"), ("PORTABLE_ATTN_STRICT", None),
                  ("PORTABLE_ATTN_PLATFORM", None), ("PORTABLE_ATTN_INTERPRET", None))
LIMIT = 4096  # signatures kept (an engine meets about ops x batch sizes); past it the oldest goes
NO_SELECTION = object()  # the `backend` of a signature for the checks alone (dispatch.make_call)
VALUES = "index values checked"  # the last of the items of a signature whose index values are checked per call


class Passed(NamedTuple):
    normalised: dict         # the arguments the checks normalised, by name (the CPU's default state_indices too)
    rows: int | None         # bsz of the default state_indices the checks filled in off the CPU, else None
    values: bool             # the op's index-value checks (`Op.values`) run on each call
    out: bool                # an `out` is given: its overlap is checked on each call
    plain: bool              # nothing to replay per call but `normalised` (no rows, values or out)
    run: object | None       # the op's function of the backend chosen for this signature, where kept


PASSED: dict = {}  # signature -> Passed, oldest first (the public ops read it inline)


FAST: dict = {}    # a signature's items -> the Fast of the last call with them that ran a remembered choice
GUARDS: dict = {}  # signature -> its Fast (built once per signature: calls of two signatures may alternate)


SAME = object()  # in Fast.normalised: the argument the call gave is the one to pass


class Fast(NamedTuple):
    check: object            # TensorGuards.check of a call's tensors (tensors_source): True where another call's
                             # have the same dispatch keys, dtypes, devices, shapes, strides and requires_grad
    passed: Passed           # what the signature of both calls passed, its backend's function kept
    normalised: tuple | None  # where nothing else is replayed (Passed.plain): per `replaceable` argument, the value
                              # its checks put in its place, else SAME (fast_call_source)
    run: object              # passed.run (the fast path reads one object fewer)


def forget() -> None:
    """Drop every signature (registry.rediscover: the backends may have changed)."""
    PASSED.clear()
    FAST.clear()
    GUARDS.clear()


def keep(items, key, passed: Passed, replaceable: tuple, *tensors) -> None:
    """Let the next call with these items and tensors like these skip its signature `key`: a call's items are
    cheap to compute, its tensors' metadata is not (a decode step's Python runs from caches its kernels evicted).
    Their guard is torch's own C++ check, dynamo's before it reuses a graph; it refuses a tensor given twice, so
    such calls are not kept. Nor are calls with a tensor that requires grad: the items leave grad mode out, which
    changes nothing for tensors that do not (Call.needs_grad), and the guard compares requires_grad."""
    fast = GUARDS.get(key)
    if fast is None or not fast.check(*tensors):  # new, or its tensors' strides changed
        if (TensorGuards is None or len(set(map(id, tensors))) < len(tensors)
                or any(t.requires_grad for t in tensors)):
            return
        try:
            guard = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                 dynamic_dims_strides=[list(t.stride()) for t in tensors])
        except Exception:  # noqa: BLE001 - a layout without strides, or a torch whose guard differs: not kept
            return
        if not guard.check(*tensors):
            return
        normalised = tuple(passed.normalised.get(n, SAME) for n in replaceable) if passed.plain else None
        fast = _store(GUARDS, key, Fast(guard.check, passed, normalised, passed.run))
    _store(FAST, items, fast)


def _store(memo: dict, key, value):
    """memo[key] = value, the oldest entry dropped first where `key` is new and `memo` holds LIMIT."""
    if key not in memo and len(memo) >= LIMIT:
        del memo[next(iter(memo))]
    memo[key] = value
    return value


def _value(v):
    """The hashable key of a non-tensor argument: its type and value (the sign of a zero float included)."""
    if isinstance(v, float):
        return float, v, math.copysign(1.0, v)
    if type(v) in (tuple, list):
        return type(v), tuple(_value(e) for e in v)
    return type(v), v


# The key of one argument by its declared type (optable.Arg.type), items of its name `{x}`, in two parts. The
# signature's *items*: a tensor's type (NoneType for an optional one not given); a bool's or a str's type and value; a
# float's with its sign (-0.0 is not 0.0); a HINTS int's type and sign; a list's type, its items' types and values,
# and for a float list their signs. Its *tensors*: each tensor's shape, dtype and device (True on the CPU: cheaper to
# read and to hash). An argument of another type than declared gives another key or raises (then the call takes the
# full checks). A required argument's items lie flat (a tuple each costs its allocation and its hash), but a list's
# (of any length) in a tuple of its own, as an optional one's, or None. The tensors' requires_grad flags follow in
# one tuple where grad mode is on for a selection (`_grad`; only selection reads them, and only then:
# Call.needs_grad), else None.
_TENSOR = "{x}.shape, {x}.dtype, {x}.is_cpu or {x}.device"
_ITEMS = {"Tensor": "type({x})", "bool": "type({x}), {x}", "float": "type({x}), {x}, _copysign(1.0, {x})",
          "str": "type({x}), {x}", "int": "type({x}), {x}", "int[]": "(type({x}), *map(type, {x}), *{x})",
          "float[]": "(type({x}), *map(type, {x}), *{x}, *map(_sign, {x}))"}


def _item(arg) -> str:
    kind = arg.type.rstrip("?")
    if kind == "Tensor":  # NoneType where an optional tensor is not given
        return f"type({arg.name})"
    items = ("type({x}), {x} >= 0" if arg.name in HINTS else _ITEMS[kind]).format(x=arg.name)
    return f"None if {arg.name} is None else ({items},)" if arg.type.endswith("?") else items


def _env_item(name: str, when: str | None) -> str:
    read = f"_env({envs.key(name)!r})"
    return read if when is None else f"({read} if {when} else None)"


def _tensor_items(arg) -> str:
    items = _TENSOR.format(x=arg.name)
    return f"None if {arg.name} is None else ({items},)" if arg.type.endswith("?") else items


def _tensor_args(decl) -> list:
    return [a for a in decl.args if a.type in ("Tensor", "Tensor?")]


def items_source(decl, indent: str = "    ") -> list[str]:
    """Statements that set `_items` to the part of a call's signature that is not its tensors' metadata (their
    types included) from its arguments (local names) and `backend`: one tuple expression, no loop over the
    arguments; None where the checks must run in full. Helper names start with `_` (no argument's name does);
    `SCOPE` holds them."""
    masks = [a.name for a in decl.args if a.type == "BlockMask?"]
    index = [a for a in decl.args if a.name in INDEX_ARGS]
    parts = [_item(a) for a in decl.args if a.type != "BlockMask?"]
    body = []
    if index:  # the index values of this call: unchecked, or checked by the op's `values` on every call
        given = ("True" if any(a.type == "Tensor" for a in index)  # a required index tensor
                 else " or ".join(f"{a.name} is not None" for a in index))
        body.append(f"_values = ({given}) and type({decl.primary}) in _TENSOR_TYPES and "
                    f"_CHECK.get(_env({envs.key(CHECK_VAR)!r})) is not False and _index_checks_enabled({decl.primary})")
        parts.append("_VALUES if _values else None")
    body += ["try:",
             f"    _items = ({decl.name!r}, backend if backend is None or type(backend) is str else _value(backend), "
             f"{', '.join(_env_item(n, when) for n, when in SELECTION_VARS)},",
             *(f"              {p}," for p in parts),
             "    )",
             "except (AttributeError, TypeError):  # not the declared type: the full checks say what",
             "    pass"]
    if index and decl.values is None:  # no per-call value checks to replay: checked calls take the full checks
        body.append("if _values:")
        body.append("    _items = None")
    if masks:  # a mask's tensors: the full checks
        body = [f"if {' and '.join(f'{m} is None' for m in masks)}:", *("    " + line for line in body)]
    return [indent + line for line in ["_items = None", *body]]


def key_source(decl, indent: str = "    ") -> list[str]:
    """Statements that set `_key`, the signature of a call (None where the checks must run in full), from
    `_items` (`items_source`'s) and the tensors' metadata."""
    tensors = _tensor_args(decl)
    grads = [f"{a.name}.requires_grad" if a.type == "Tensor" else f"{a.name} is not None and {a.name}.requires_grad"
             for a in tensors]
    return [indent + line for line in [
        "_key = None",
        "if _items is not None:",
        "    _grad = backend is not _NO_SELECTION and _is_grad_enabled()",
        "    try:",
        "        _key = (_items,",
        *(f"                {_tensor_items(a)}," for a in tensors),
        f"                ({', '.join(grads)},) if _grad else None)",
        "    except (AttributeError, TypeError):  # not the declared type: the full checks say what",
        "        pass"]]


_NONES: list = []  # stand-ins for optional tensors not given, one per place (the guard refuses a tensor twice)


def tensors_source(decl) -> str:
    """The call's tensor arguments in declaration order, as `FAST`'s guard takes them (`_NONES` for those not
    given)."""
    names, optional = [], 0
    for a in _tensor_args(decl):
        if a.type == "Tensor":
            names.append(a.name)
            continue
        if optional == len(_NONES):
            _NONES.append(torch.empty(0))
        names.append(f"_NONES[{optional}] if {a.name} is None else {a.name}")
        optional += 1
    return ", ".join(names)


def replaceable(decl) -> tuple:
    """The arguments a remembered call's checks may have normalised (`_remember`): all but the tensors, and the
    default state_indices."""
    return tuple(a.name for a in decl.args if a.type not in ("Tensor", "Tensor?") or a.name == "state_indices")


def fast_call_source(decl) -> str:
    """The keyword arguments the backend's function gets for a call answered by `FAST` with nothing to replay: the
    call's own, but where its Fast.normalised (`_n`) holds what the checks put in their place."""
    index = {n: i for i, n in enumerate(replaceable(decl))}
    return ", ".join(f"{n}={n}" if n not in index else f"{n}={n} if _n[{index[n]}] is _SAME else _n[{index[n]}]"
                     for n in decl.names)


def items_of(key) -> tuple:
    """The items of signature `key` (`items_source`): the op's name first, the index-values mark last."""
    return key[0]


# The names the statements of `items_source` and `key_source` use.
SCOPE = dict(_value=_value, _copysign=math.copysign, _sign=functools.partial(math.copysign, 1.0),
             _NO_SELECTION=NO_SELECTION, _is_grad_enabled=torch.is_grad_enabled, _env=envs.lookup,
             _TENSOR_TYPES=TENSOR_TYPES, _VALUES=VALUES, _CHECK=envs.PARSED[CHECK_VAR], _NONES=_NONES, _SAME=SAME,
             _index_checks_enabled=checks.index_checks_enabled)


def _keyer(decl):
    """The signature function of op `decl`: its arguments in order then `backend`, positional or by name."""
    lines = [f"def signature({', '.join(decl.names)}, backend):", *items_source(decl), *key_source(decl),
             "    return _key"]
    scope = dict(SCOPE)
    exec("\n".join(lines), scope)  # noqa: S102 - source built above from the op table, nothing from a caller
    return scope["signature"]


_KEYERS: dict = {}  # op name -> its generated signature function


def keyer(decl):
    """Op `decl`'s signature function: (its arguments, backend) -> the signature, None when the checks must
    run in full. Calls whose arguments are not all of the declared kinds may get one: only a call that
    passed the full checks with `storable` arguments is remembered under it."""
    fn = _KEYERS.get(decl.name)
    if fn is None:
        fn = _KEYERS[decl.name] = _keyer(decl)
    return fn


def signature(decl, a: dict, backend=NO_SELECTION):
    """`a`'s signature for op `decl` (and for choosing a backend by `backend=`): `keyer` on a dict."""
    return keyer(decl)(**a, backend=backend)


def storable(decl, a: dict) -> bool:
    """Whether a call may be remembered: tensor arguments of exact tensor types (a fake or functional
    tensor is not), the others plain values (bool, int, float, str, None, lists of them)."""
    for arg in decl.args:
        v = a[arg.name]
        kind = type(v)
        if v is None or (kind in TENSOR_TYPES if arg.type.startswith("Tensor") else _plain(v)):
            continue
        return False
    return True


def _plain(v) -> bool:
    kind = type(v)
    return kind in PLAIN or kind in (tuple, list) and all(map(_plain, v))


def lookup(key) -> Passed | None:
    try:
        return None if key is None else PASSED.get(key)
    except TypeError:  # an unhashable argument (an array, a dict): never remembered
        return None


def check(decl, a: dict, key, passed: Passed | None) -> dict:
    """`decl.check(a)`: replayed from `passed`, else run (and remembered under `key` unless None)."""
    if passed is None:
        given = dict(a)
        a = decl.check(a)
        if key is not None and storable(decl, given):
            _remember(key, given, a)
        return a
    a.update(passed.normalised)
    return a if passed.plain else replay(decl, a, passed)


def replay(decl, a: dict, passed: Passed) -> dict:
    """The per-call checks of a remembered call on its normalised arguments `a`: the default state_indices off the
    CPU, the index values unless the remembered backend checks them itself, the `out` overlap."""
    if passed.rows is not None:
        a["state_indices"] = checks.default_rows(passed.rows, a[decl.primary].device)
    if passed.values:
        decl.values(a)
    if passed.out:
        checks.no_overlap(a, a["out"])
    return a


def keeps_choice(backend: Backend) -> bool:
    """Whether this backend's refusals are all functions of a signature (Backend's own rules only)."""
    cls, own = type(backend), backend.__dict__.keys()
    return (not backend.support and cls.available is Backend.available and cls.serves is Backend.serves
            and cls.supports is Backend.supports and cls.run is Backend.run and cls.impl is Backend.impl
            and not own & {"available", "serves", "supports", "run", "impl"})


def remember_backend(key, backend: Backend) -> None:
    passed = PASSED.get(key)
    if passed is not None:  # a backend that checks the op's index values itself: no Op.values on replay
        op = items_of(key)[0]
        values = passed.values and op not in backend.checks_values
        PASSED[key] = passed._replace(run=getattr(backend.impl(), op), values=values,
                                      plain=passed.rows is None and not values and not passed.out)


def _remember(key, given: dict, checked: dict) -> None:
    normalised, rows = {}, None
    for name, v in checked.items():
        if v is given[name]:  # a HINTS int included: checks.positive_int returns an int itself
            continue
        if isinstance(v, torch.Tensor):
            if name != "state_indices" or given[name] is not None:
                return  # a normalisation this module does not know how to replay
            if v.is_cpu:  # checks.default_rows' kept tensor
                normalised[name] = v
            else:
                rows = v.shape[0]
        else:
            normalised[name] = v
    try:
        hash(key)
    except TypeError:  # an argument the checks accepted but a key cannot hold
        return
    values, out = items_of(key)[-1] is VALUES, given.get("out") is not None
    _store(PASSED, key, Passed(normalised, rows, values, out, rows is None and not values and not out, None))
