"""Every op of the torch backend, by name."""
from .attention import attention  # noqa: F401
from .paged import paged_attention  # noqa: F401
from .cache import write_kv_cache  # noqa: F401
