"""STUB: being built (issue 5)."""
from portable_attn.errors import NotSupported



def gated_delta_rule(*args, **kwargs):
    raise NotSupported("triton", "gated_delta_rule", "not built yet")
