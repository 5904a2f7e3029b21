"""Every op of the triton backend, by name."""
from .attention import attention  # noqa: F401
from .cache import write_kv_cache  # noqa: F401
from .conv import causal_conv1d, causal_conv1d_step  # noqa: F401
from .delta import gated_delta_rule  # noqa: F401
from .linear import linear_attention  # noqa: F401
from .merge import merge_attention_states  # noqa: F401
from .paged import paged_attention  # noqa: F401
from .sparse import sparse_attention  # noqa: F401
from .ssd import ssd  # noqa: F401
from .steps import gated_delta_rule_step, linear_attention_step, ssd_step  # noqa: F401
