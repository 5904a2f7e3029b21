"""Every op of the cpu backend, by name."""
from .attention import attention  # noqa: F401
from .conv import causal_conv1d, causal_conv1d_step  # noqa: F401
from .delta import gated_delta_rule, gated_delta_rule_step  # noqa: F401
from .linear import linear_attention, linear_attention_step  # noqa: F401
from .merge import merge_attention_states  # noqa: F401
from .paged import paged_attention, write_kv_cache  # noqa: F401
from .sparse import sparse_attention  # noqa: F401
from .ssd import ssd, ssd_step  # noqa: F401
