"""STUB: being built (issue 5)."""
from portable_attn.errors import NotSupported



def causal_conv1d(*args, **kwargs):
    raise NotSupported("triton", "causal_conv1d", "not built yet")


def causal_conv1d_step(*args, **kwargs):
    raise NotSupported("triton", "causal_conv1d_step", "not built yet")
