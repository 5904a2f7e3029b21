"""STUB: being built (issue 5)."""
from portable_attn.errors import NotSupported



def linear_attention(*args, **kwargs):
    raise NotSupported("triton", "linear_attention", "not built yet")
