"""One declaration per op: everything the code knows about an op that is not its math.

The public functions' dispatch, `Backend.ops`, the `torch.library` schemas and fake kernels, the JAX
front's return conventions, the conformance runner and the support matrix all read this table; adding
an op means adding its declaration here (README, "Adding an op").
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

from . import checks

REQUIRED = object()  # the default of an argument the caller must give


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of a public op. `type` is its torch.library schema type (`BlockMask?` travels as the
    mask's tensors); an optional type (`?`) defaults to None unless `default` says otherwise."""

    name: str
    type: str
    default: object = REQUIRED
    keyword: bool = True  # keyword-only in the public op

    @property
    def value(self):
        """The default value, None for an optional argument without one, REQUIRED otherwise."""
        if self.default is REQUIRED and self.type.endswith("?"):
            return None
        return self.default


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    family: str                          # "attention" (o or (o, lse): the attention ops and their merge),
                                         # "cache" (None) or "recurrent"
    primary: str                         # the tensor whose dtype and device are the call's
    args: tuple                          # the public op's arguments in order, `backend` excluded
    check: Callable[[dict], dict]        # checks.py: validates and normalises the arguments by name
    mutates: tuple = ()                  # updated in place (a sequence form's cache only with state_indices)
    step: str | None = None              # a sequence form's step form
    sequence: str | None = None          # a step form's sequence form
    state_tail: Callable | None = None   # args -> the shape of one sequence's state
    values: Callable | None = None       # checks.py: the index-value checks alone, of a call whose shapes
                                         # passed (checkmemo.py runs them where it replays `check`)

    @functools.cached_property  # read on every call
    def names(self) -> tuple:
        return tuple(a.name for a in self.args)

    @functools.cached_property  # read on every call
    def defaults(self) -> dict:
        return {a.name: a.value for a in self.args if a.value is not REQUIRED}

    @functools.cached_property  # read on every call
    def required(self) -> tuple:
        return tuple(a.name for a in self.args if a.value is REQUIRED)

    @property
    def is_step(self) -> bool:
        return self.sequence is not None


def _tensors(*names: str, keyword: bool = False) -> tuple:
    return tuple(Arg(n, "Tensor", keyword=keyword) for n in names)


def _optional(*names: str) -> tuple:
    return tuple(Arg(n, "Tensor?") for n in names)


_ATTENTION_OPTIONS = (
    Arg("causal", "bool", False), Arg("window_size", "int[]", (-1, -1)), Arg("softcap", "float", 0.0),
    Arg("sinks", "Tensor?"), Arg("softmax_scale", "float?"), Arg("block_mask", "BlockMask?"),
)
_RETURN_LSE = (Arg("return_lse", "bool", False), Arg("out", "Tensor?"))
_STATES = (Arg("initial_state", "Tensor?"), Arg("output_final_state", "bool", False),
           *_optional("state_indices", "has_initial_state", "cu_seqlens"))
_STEP_STATE = (Arg("state", "Tensor"),)
_SSD_OPTIONS = (*_optional("D", "z", "dt_bias"), Arg("dt_softplus", "bool", False),
                Arg("dt_limit", "float[]", (0.0, math.inf)))


def _linear_tail(a):
    return a["q"].shape[1], a["q"].shape[2], a["v"].shape[2]


def _delta_tail(a):
    return a["v"].shape[1], a["q"].shape[2], a["v"].shape[2]


def _ssd_tail(a):
    return a["x"].shape[1], a["x"].shape[2], a["B"].shape[2]


def _conv_tail(a):
    return a["x"].shape[1], a["weight"].shape[1] - 1


def _recurrent(name, primary, positional, options, check, step_check, tail, *, trailing=()):
    """A sequence form and its step form (`state=` instead of the state arguments, no cu_seqlens)."""
    out = (Arg("out", "Tensor?"),)
    seq = Op(name, "recurrent", primary, positional + options + _STATES + trailing + out, check,
             mutates=("initial_state",), step=f"{name}_step", state_tail=tail, values=checks.recurrent_values)
    step = Op(f"{name}_step", "recurrent", primary, positional + _STEP_STATE + options
              + (Arg("state_indices", "Tensor?"),) + trailing + out, step_check, mutates=("state",),
              sequence=name, state_tail=tail, values=checks.recurrent_values)
    return seq, step


def _step_check(check):
    return lambda a: check(a, step=True)


_DECLARATIONS = (
    Op("attention", "attention", "q",
       _tensors("q", "k", "v") + _optional("cu_seqlens_q", "cu_seqlens_k")
       + (Arg("max_seqlen_q", "int?"), Arg("max_seqlen_k", "int?")) + _ATTENTION_OPTIONS + _RETURN_LSE,
       checks.check_attention, values=checks.attention_values),
    Op("paged_attention", "attention", "q",
       _tensors("q", "k_cache", "v_cache", "block_table", "seqused_k") + _optional("cu_seqlens_q")
       + (Arg("max_seqlen_q", "int?"), Arg("max_seqlen_k", "int?"), Arg("causal", "bool", True))
       + _ATTENTION_OPTIONS[1:] + _RETURN_LSE,
       checks.check_paged_attention, values=checks.paged_values),
    Op("write_kv_cache", "cache", "k", _tensors("k", "v", "k_cache", "v_cache", "slot_mapping"),
       checks.check_write_kv_cache, mutates=("k_cache", "v_cache"), values=checks.write_kv_values),
    Op("sparse_attention", "attention", "q",
       _tensors("q", "k", "v", "indices") + _optional("cu_seqlens_q", "cu_seqlens_k")
       + (Arg("softcap", "float", 0.0), Arg("sinks", "Tensor?"), Arg("softmax_scale", "float?")) + _RETURN_LSE,
       checks.check_sparse_attention, values=checks.sparse_values),
    Op("merge_attention_states", "attention", "o_a", _tensors("o_a", "lse_a", "o_b", "lse_b")
       + (Arg("sinks", "Tensor?"),) + _RETURN_LSE, checks.check_merge_attention_states),
    *_recurrent("linear_attention", "q", _tensors("q", "k", "v"), (Arg("g", "Tensor?"), Arg("scale", "float?")),
                checks.check_linear_attention, _step_check(checks.check_linear_attention), _linear_tail),
    *_recurrent("gated_delta_rule", "q", _tensors("q", "k", "v", "g", "beta"), (Arg("scale", "float?"),),
                checks.check_gated_delta_rule, _step_check(checks.check_gated_delta_rule), _delta_tail,
                trailing=(Arg("use_qk_l2norm", "bool", False),)),
    *_recurrent("ssd", "x", _tensors("x", "dt", "A", "B", "C"), _SSD_OPTIONS, checks.check_ssd,
                _step_check(checks.check_ssd), _ssd_tail),
    *_recurrent("causal_conv1d", "x", _tensors("x", "weight") + (Arg("bias", "Tensor?", keyword=False),),
                (Arg("activation", "str?"),), checks.check_causal_conv1d,
                _step_check(checks.check_causal_conv1d), _conv_tail),
)

OPS: dict[str, Op] = {op.name: op for op in _DECLARATIONS}
NAMES = tuple(OPS)
