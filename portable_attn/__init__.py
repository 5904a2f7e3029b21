"""portable_attn: the primitives of hybrid LLMs behind one operator contract (docs/spec.md)."""
from .errors import BackendUnavailable, NotSupported
from .masks import BlockMask
from .ops import (
    attention, causal_conv1d, causal_conv1d_step, gated_delta_rule, gated_delta_rule_step, linear_attention,
    linear_attention_step, merge_attention_states, paged_attention, sparse_attention, ssd, ssd_step, write_kv_cache,
)
from .platforms import Platform

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "BlockMask", "NotSupported", "Platform", "attention", "causal_conv1d",
    "causal_conv1d_step", "gated_delta_rule", "gated_delta_rule_step", "linear_attention", "linear_attention_step",
    "merge_attention_states", "paged_attention", "sparse_attention", "ssd", "ssd_step", "write_kv_cache",
]
