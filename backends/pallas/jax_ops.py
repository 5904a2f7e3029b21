"""Every op of the pallas backend on jax.Arrays, by name: what the JAX front (`portable_attn.jax`) runs."""
from .attention import attention  # noqa: F401
from .cache import write_kv_cache  # noqa: F401
from .conv import causal_conv1d, causal_conv1d_step  # noqa: F401
from .delta import gated_delta_rule, gated_delta_rule_step  # noqa: F401
from .linear import linear_attention, linear_attention_step  # noqa: F401
from .merge import merge_attention_states  # noqa: F401
from .paged import paged_attention  # noqa: F401
from .sparse import sparse_attention  # noqa: F401
from .ssd import ssd, ssd_step  # noqa: F401
