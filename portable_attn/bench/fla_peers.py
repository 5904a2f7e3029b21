"""flash-linear-attention (`fla`, pip fla-core) as peers of the recurrent ops: its Triton chunk kernels for
prefill, its fused recurrent kernels with T=1 for the step forms. GPU only.

fla's layout is [B, T, H, ...]: a prefill is one sequence [1, T, H, ...] (a view of ours), a step is
B sequences of one token [B, 1, H, ...]. The mappings take the kernel as an argument so that they can be
checked against the reference with a stand-in kernel where fla cannot run (tests/test_bench.py).
Mamba-2's SSD is simple GLA with q = C, k = B, v = dt·x, g = dt·A, scale 1 and a state [N, P]
(`state_v_first`: [P, N], ours); the dt preprocessing and the D skip around the kernel are timed, as
the work the op does.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from .impls import Impl, Refused


def _kernel(args: dict, module: str, name: str):
    if next(iter(args.values())).device.type != "cuda":
        raise Refused("skipped", "fla's kernels run on CUDA only")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise Refused("skipped", f"flash-linear-attention (fla-core) is not installed ({exc})") from None


def _scale(args: dict) -> float:
    return args.get("scale") or args["q"].shape[-1] ** -0.5


def _state(args: dict) -> dict:
    """A step's state cache handed to fla as the initial state of B one-token sequences; fla returns the new
    state as a fresh float32 tensor: the same bytes as our in-place update (no copy back is timed)."""
    if args.get("state_indices") is not None:
        raise Refused("skipped", "fla's recurrent kernels take the states in batch order (no state_indices)")
    return dict(initial_state=args["state"], output_final_state=True)


def ssd_as_simple_gla(args: dict, kernel, step: bool):
    """The timed call of SSD through a simple-GLA kernel `kernel(q, k, v, g, scale=, **state)`."""
    if args.get("z") is not None:
        raise Refused("skipped", "the simple-GLA mapping has no gate z")
    x, dt, A, D = args["x"], args["dt"], args["A"], args.get("D")
    lead = 1 if step else 0  # step: [B, 1, H, ...]; prefill: [1, T, H, ...]
    H = x.shape[1]
    q, k = (args[n].repeat_interleave(H // args[n].shape[1], dim=1).unsqueeze(lead).contiguous() for n in "CB")
    state = _state(args) | dict(state_v_first=True) if step else {}
    lo, hi = args.get("dt_limit", (0.0, float("inf")))
    activate = F.softplus if args.get("dt_softplus") else (lambda t: t)

    def call():
        d = activate(dt.float() + (0 if args.get("dt_bias") is None else args["dt_bias"])).clamp(lo, hi)
        v = (x.float() * d[..., None]).to(x.dtype).unsqueeze(lead)
        o, final = kernel(q, k, v, (d * A).unsqueeze(lead), scale=1.0, **state)
        o = o.squeeze(lead).float()
        if D is not None:
            o = o + D.view(H, -1) * x.float()
        return o.to(x.dtype), final
    return call


def gdr_call(args: dict, kernel, step: bool):
    """The timed call of the gated delta rule through `kernel(q, k, v, g, beta, scale=, use_qk_l2norm_in_kernel=)`."""
    lead = 1 if step else 0
    q, k, v, g, beta = (args[n].unsqueeze(lead) for n in ("q", "k", "v", "g", "beta"))
    state = _state(args) if step else {}
    return functools.partial(kernel, q, k, v, g, beta, scale=_scale(args),
                             use_qk_l2norm_in_kernel=args["use_qk_l2norm"], **state)


def gla_call(args: dict, kernel, step: bool):
    """The timed call of GLA (`g [.., H, K]`) through `kernel(q, k, v, g, scale=)` (chunk) or `gk=` (recurrent)."""
    lead = 1 if step else 0
    q, k, v, g = (args[n].unsqueeze(lead) for n in ("q", "k", "v", "g"))
    if step:
        return functools.partial(kernel, q, k, v, gk=g, scale=_scale(args), **_state(args))
    return functools.partial(kernel, q, k, v, g, scale=_scale(args))


def conv_step_call(args: dict, kernel):
    """The timed call of a conv step through fla's `causal_conv1d_update(x, cache, weight=, bias=, activation=)`,
    whose cache [B, C, W] holds the W newest inputs (ours: the W-1 before the token): built once in setup."""
    state = _state(args)["initial_state"]
    cache = torch.cat([state.new_zeros(*state.shape[:2], 1), state], dim=2).contiguous()
    return functools.partial(kernel, args["x"], cache, weight=args["weight"], bias=args.get("bias"),
                             activation=args.get("activation"))


def _ops(module, kernel, adapt, step):
    return lambda args, sizes: adapt(args, _kernel(args, module, kernel), step)


GLA = "fla.ops.gla"
FLA_PEERS = (
    Impl("fla-ssd", "peer", "fla chunk_simple_gla(q=C, k=B, v=dt·x, g=dt·A, scale=1) on [1, T, H, ...], B and C "
         "repeated to the H heads in setup; softplus(dt + dt_bias), dt·x and the D skip timed with it",
         _ops("fla.ops.simple_gla", "chunk_simple_gla", ssd_as_simple_gla, False)),
    Impl("fla-gdr", "peer", "fla chunk_gated_delta_rule(use_qk_l2norm_in_kernel=True) on [1, T, H, ...] views",
         _ops("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", gdr_call, False)),
    Impl("fla-gla", "peer", "fla chunk_gla(q, k, v, g) on [1, T, H, ...] views",
         _ops(GLA, "chunk_gla", gla_call, False)),
    Impl("fla-ssd-step", "peer", "fla fused_recurrent_simple_gla on B one-token sequences (the SSD mapping of "
         "fla-ssd, state_v_first=True), the state cache as initial_state, the new float32 state returned",
         _ops("fla.ops.simple_gla", "fused_recurrent_simple_gla", ssd_as_simple_gla, True)),
    Impl("fla-gdr-step", "peer", "fla fused_recurrent_gated_delta_rule(use_qk_l2norm_in_kernel=True) on B "
         "one-token sequences, the state cache as initial_state, the new float32 state returned",
         _ops("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule", gdr_call, True)),
    Impl("fla-gla-step", "peer", "fla fused_recurrent_gla(gk=g) on B one-token sequences, the state cache as "
         "initial_state, the new float32 state returned",
         _ops(GLA, "fused_recurrent_gla", gla_call, True)),
    Impl("fla-conv-step", "peer", "fla causal_conv1d_update(x, cache [B, C, W], weight, bias, 'silu'): its cache "
         "in place, one column wider than ours",
         lambda args, sizes: conv_step_call(args, _kernel(args, "fla.modules.causal_conv1d", "causal_conv1d_update"))),
)
