"""STUB: being built (issue 5)."""
from portable_attn.errors import NotSupported



def linear_attention_step(*args, **kwargs):
    raise NotSupported("triton", "linear_attention_step", "not built yet")


def gated_delta_rule_step(*args, **kwargs):
    raise NotSupported("triton", "gated_delta_rule_step", "not built yet")


def ssd_step(*args, **kwargs):
    raise NotSupported("triton", "ssd_step", "not built yet")
