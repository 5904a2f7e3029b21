"""Every op of the reference backend, by name (the registry calls `getattr(module, op)`)."""
from .attention import attention, paged_attention, sparse_attention, write_kv_cache  # noqa: F401
from .merge import merge_attention_states  # noqa: F401
from .recurrent import (  # noqa: F401
    causal_conv1d, causal_conv1d_step, gated_delta_rule, gated_delta_rule_step, linear_attention,
    linear_attention_step, ssd, ssd_step,
)
