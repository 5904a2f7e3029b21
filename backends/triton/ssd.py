"""STUB: being built (issue 5)."""
from portable_attn.errors import NotSupported



def ssd(*args, **kwargs):
    raise NotSupported("triton", "ssd", "not built yet")
