"""A call's checks and backend choice, remembered by its signature: the host cost of a decode step.

checks.py's rules read, of each tensor, its type, shape, dtype and device, and of each other argument
its type and value; beyond those only index *values* and, for `out`, the memory it spans. So a call
whose signature (those fields of every argument) matches one that passed its checks passes them too,
with the same normalised arguments: a hit replays them (scales, windows, the default `state_indices`)
and runs only what a signature cannot hold, the `out` overlap check. A call whose index values are
checked (an index tensor given and `checks.index_checks_enabled()`) is replayed too where its op
declares those checks on their own (`Op.values`), which then run on every call; otherwise it takes the
full checks, as do calls with a BlockMask and calls whose signature is not hashable.

The backend chosen for a signature is kept too where the choice is a function of it: the signature
then also holds `backend=`, the environment variables selection reads, grad mode and each tensor's
requires_grad, and the backend is one whose refusals are all the base class's (no `support` module,
no availability probe), chosen without a fallback.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import checks, envs
from .backend import Backend

# Arguments whose values (not only shapes) the checks read when index checks are enabled.
INDEX_ARGS = frozenset({"cu_seqlens_q", "cu_seqlens_k", "cu_seqlens", "block_table", "seqused_k", "slot_mapping",
                        "indices", "state_indices"})
TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # exact types: a subclass (fake, functional) is not remembered
PLAIN = (bool, int, str)  # keyed as (type, value) without a call to `_value`
# Host ints the checks read only as >= 0 and against index values (checked per call): keyed by their sign,
# so that a decode step's growing max_seqlen_k keeps its signature.
HINTS = frozenset({"max_seqlen_q", "max_seqlen_k"})
SELECTION_VARS = ("PORTABLE_ATTN_BACKEND", "PORTABLE_ATTN_STRICT", "PORTABLE_ATTN_PLATFORM", "PORTABLE_ATTN_INTERPRET")
LIMIT = 4096  # signatures kept (an engine meets about ops x batch sizes); past it the oldest goes
NO_SELECTION = object()  # the `backend` of a signature for the checks alone (dispatch.make_call)
VALUES = "index values checked"  # the last item of a signature whose index values are checked per call


class Passed(NamedTuple):
    normalised: dict         # the non-tensor arguments the checks normalised, by name
    rows: int | None         # bsz of the default state_indices the checks filled in, else None
    impl: object | None      # the module of the backend chosen for this signature (Backend.impl), where kept


_PASSED: dict = {}  # signature -> Passed, oldest first


def forget() -> None:
    """Drop every signature (registry.rediscover: the backends may have changed)."""
    _PASSED.clear()


def _value(v):
    """The hashable key of a non-tensor argument: its type and value (the sign of a zero float included)."""
    if isinstance(v, float):
        return float, v, math.copysign(1.0, v)
    if type(v) in (tuple, list):
        return type(v), tuple(_value(e) for e in v)
    return type(v), v


def signature(decl, a: dict, backend=NO_SELECTION):
    """`a`'s signature for op `decl` (and for choosing a backend by `backend=`), or None when its checks
    must run in full."""
    grad = backend is not NO_SELECTION and torch.is_grad_enabled()
    key, index = [decl.name, (str, backend) if type(backend) is str else _value(backend), grad,
                  envs.texts(SELECTION_VARS)], False
    for name in decl.names:
        v = a[name]
        kind = type(v)
        if v is None:
            key.append(None)
        elif kind in TENSOR_TYPES:
            key.append((kind, v.shape, v.dtype, v.device, v.requires_grad) if grad
                       else (kind, v.shape, v.dtype, v.device))
            index = index or name in INDEX_ARGS
        elif kind in PLAIN:
            key.append((kind, v >= 0) if kind is int and name in HINTS else (kind, v))
        elif isinstance(v, (torch.Tensor, checks.BlockMask)):
            return None
        else:
            key.append(_value(v))
    if index:  # index values: unchecked, or checked by the op's `values` on every call
        primary = a[decl.primary]
        if type(primary) not in TENSOR_TYPES:
            return None
        values = checks.index_checks_enabled(primary)
        if values and decl.values is None:
            return None
        key.append(VALUES if values else None)
    key = tuple(key)
    try:
        hash(key)
    except TypeError:  # an array, a dict, ...: unhashable
        return None
    return key


def lookup(key) -> Passed | None:
    return None if key is None else _PASSED.get(key)


def check(decl, a: dict, key, passed: Passed | None) -> dict:
    """`decl.check(a)`: replayed from `passed`, else run (and remembered under `key` unless None)."""
    if passed is None:
        given = dict(a)
        a = decl.check(a)
        if key is not None:
            _remember(key, given, a)
        return a
    a.update(passed.normalised)
    if passed.rows is not None:
        a["state_indices"] = checks.default_rows(passed.rows, a[decl.primary].device)
    if key[-1] is VALUES:
        decl.values(a)
    if a.get("out") is not None:
        checks.no_overlap(a, a["out"])
    return a


def keeps_choice(backend: Backend) -> bool:
    """Whether this backend's refusals are all functions of a signature (Backend's own rules only)."""
    cls, own = type(backend), backend.__dict__.keys()
    return (not backend.support and cls.available is Backend.available and cls.serves is Backend.serves
            and cls.supports is Backend.supports and cls.run is Backend.run and cls.impl is Backend.impl
            and not own & {"available", "serves", "supports", "run", "impl"})


def remember_backend(key, backend: Backend) -> None:
    passed = _PASSED.get(key)
    if passed is not None:
        _PASSED[key] = passed._replace(impl=backend.impl())


def _remember(key, given: dict, checked: dict) -> None:
    normalised, rows = {}, None
    for name, v in checked.items():
        if v is given[name]:  # a HINTS int included: checks.positive_int returns an int itself
            continue
        if isinstance(v, torch.Tensor):
            if name != "state_indices" or given[name] is not None:
                return  # a normalisation this module does not know how to replay
            rows = v.shape[0]
        else:
            normalised[name] = v
    if len(_PASSED) >= LIMIT:
        del _PASSED[next(iter(_PASSED))]
    _PASSED[key] = Passed(normalised, rows, None)
