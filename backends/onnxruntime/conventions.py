"""Where ONNX Runtime's operators and docs/spec.md disagree, in one place. Each point has a test in
tests/backends/onnxruntime/test_conventions.py that fails if the other convention were taken.

- Causal alignment: ONNX `Attention`'s `is_causal` is top-left unless a past or `nonpad_kv_seqlen` is
  given. It is never used: what each query sees is computed from our positions (query t of a sequence
  with Lq queries and Lk keys at p = t + Lk - Lq, bottom-right) and passed as the mask (`visibility`).
- Windows: `window_size = (left, right)` enters that mask as docs/spec.md says (`GroupQueryAttention`'s
  `local_window_size` would be left + 1; it is not used).
- Sinks: ONNX `Attention` has no sink input. A sink is one more key of zeros whose additive mask is the
  sink logit (after softcap, which the op applies before the mask): exp(sink) joins the denominator, its
  value row is zero (`SINK_KEYS`).
- Scale: `Attention` refuses `scale = 0`; q is multiplied by the scale in the graph and the op gets 1.
  `GatedDeltaNet` reads `scale = 0` as 1/sqrt(K); `gdn_scale` maps ours onto its attribute.
- GQA: ONNX `Attention` maps query head h to kv head h // (Hq / Hkv), as docs/spec.md does;
  `GatedDeltaNet` maps value head h to q/k head h // (Hv / H), as the delta rule and SSD's B/C groups do.
- State layout: `GatedDeltaNet` keeps [S, Hv, V, K] (V-major); linear attention and the delta rule keep
  [S, H, K, V] (`STATE_PERM` swaps them). SSD's [S, H, P, N] is already V-major with V = P, K = N.
- Lengths: `VarlenCausalConvWithState` wants every sequence to have a token; empty sequences are left
  out of the graph and keep their initial state (`states.py`).
"""
from __future__ import annotations

STATE_PERM = (0, 1, 3, 2)  # ours [S, H, K, V] <-> GatedDeltaNet's [S, H, V, K] (its own inverse)
SINK_KEYS = 1              # keys of zeros appended per sequence when sinks are given


def gdn_scale(scale: float) -> tuple[float, float | None]:
    """(GatedDeltaNet's `scale` attribute, a factor the graph applies to the output or None): its 0 means
    1/sqrt(K), so ours 0 becomes 1 and a product by 0 (exact: the output is linear in the scale)."""
    return (scale, None) if scale != 0.0 else (1.0, 0.0)
