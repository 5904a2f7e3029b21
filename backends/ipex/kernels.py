"""IPEX's modules, imported on the first call (importing IPEX loads its kernels and overrides aten ops)."""
import functools


@functools.cache
def llm():
    import intel_extension_for_pytorch as ipex

    return ipex.llm
