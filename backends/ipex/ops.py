"""Every op of the ipex backend, by name."""
from .attention import attention, paged_attention  # noqa: F401
from .cache import write_kv_cache  # noqa: F401
from .conv import causal_conv1d_step  # noqa: F401
