"""Every environment variable portable_attn reads, declared once: name, default, parser, one line of doc.

Read them as attributes (`envs.PORTABLE_ATTN_CHECK`): each access reads the current environment (its
text parsed once per distinct value), so a test or a user that sets a variable at run time is seen at the
next call. The README's table and
`portable-attn info` are generated from `VARS`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
from typing import Callable


def _flag(text: str) -> bool:
    return text.strip() not in ("", "0")


def _names(text: str) -> tuple:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _text(text: str) -> str | None:
    return text.strip() or None


@dataclasses.dataclass(frozen=True)
class Var:
    name: str
    default: str
    parse: Callable[[str], object]
    doc: str


VARS = {v.name: v for v in (
    Var("PORTABLE_ATTN_BACKEND", "", _names,
        "a backend, or a priority list `a,b`: the first that can run a call runs it; each skip is logged once per "
        "op, backend and reason, at WARNING on the `portable_attn` logger"),
    Var("PORTABLE_ATTN_STRICT", "0", _flag,
        "`1`: never fall back: the first backend must run the call or it raises with its reason"),
    Var("PORTABLE_ATTN_PLATFORM", "", _text,
        "`cpu`, `cuda`, `rocm`, `xpu` or `tpu`: replaces the probed platform (tests, unusual builds)"),
    Var("PORTABLE_ATTN_INTERPRET", "0", _flag,
        "`1`: run the GPU/TPU kernels in Triton's / Pallas' interpreter on the CPU (reachable by name)"),
    Var("PORTABLE_ATTN_CHECK", "1", lambda text: text.strip() != "0",
        "`0`: skip the index value checks (they are skipped anyway while tracing or capturing)"),
    Var("PORTABLE_ATTN_CPU_NATIVE", "1", _flag,
        "`0`: the cpu backend neither builds nor runs its compiled C++ kernels (prefill attention and decode then "
        "run torch's flash kernel, per tile of the causal/window band or on gathered keys where paged; softcap "
        "scores torch's tanh and softmax ops; the gated delta rule, linear attention, SSD and conv1d torch's ops)"),
    Var("PORTABLE_ATTN_TRITON_F32_DOT", "", _text,
        "the `input_precision` of the triton backend's float32 dots (`ieee`, `tf32x3`, `tf32`); default per "
        "vendor"),
    Var("PORTABLE_ATTN_ORT_PROVIDERS", "", _names,
        "the onnxruntime backend's execution providers, a priority list `a,b`; default: every provider the "
        "installed onnxruntime build has, `CPUExecutionProvider` last"),
)}


def markdown() -> str:
    """The README's table of the variables (tests/test_readme.py keeps the README current)."""
    rows = [f"| `{v.name}` | `{v.default}` | {v.doc} |" if v.default else f"| `{v.name}` | unset | {v.doc} |"
            for v in VARS.values()]
    return "\n".join(["| variable | default | what |", "|---|---|---|", *rows])


def raw(name: str) -> str:
    """The variable's text, or its default when unset."""
    return os.environ.get(name, VARS[name].default)


def is_set(name: str) -> bool:
    return bool(os.environ.get(name))


# A variable's text by `key(name)`, None where unset, in one C call: os.environ's own mapping where it is bytes ->
# bytes, read without os.environ's per-access key encoding (~1 us)
lookup, key = (os.environ._data.get, os.fsencode) if os.name == "posix" else (os.environ.get, str)


# Each variable's raw values seen so far -> their parsed values (every call reads several variables): a hot path may
# read `PARSED[name].get(lookup(key(name)))` in two C calls, None where a value is new (then read the attribute).
PARSED: dict = {name: {} for name in VARS}


def parse(name: str, text):
    """Variable `name`'s value from its text as `lookup` returns it (None where unset: its default)."""
    var = VARS[name]
    return var.parse(var.default if text is None else os.fsdecode(text))


def _reader(var: Var) -> property:
    name, parsed = key(var.name), PARSED[var.name]

    def read(_module):
        text = lookup(name)
        try:
            return parsed[text]
        except KeyError:
            value = parsed[text] = parse(var.name, text)
            return value
    return property(read, doc=var.doc)


class _Module(types.ModuleType):
    """This module's class: each variable a property (a module-level __getattr__ costs ~0.6 us a read)."""


for _var in VARS.values():
    setattr(_Module, _var.name, _reader(_var))
sys.modules[__name__].__class__ = _Module
