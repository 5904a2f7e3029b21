"""The torch backend: the vendor's attention kernels as PyTorch ships them, on every torch device:
SDPA's CPU flash kernel (its aten op, which returns lse too), elsewhere `F.scaled_dot_product_attention`
with an explicit kernel choice. What they cannot compute as SPEC says (softcap; lse and sinks off the
CPU) is refused with the reason, so a priority list sends those calls on."""
from portable_attn.backend import Backend
from portable_attn.platforms import Platform


class TorchBackend(Backend):
    name = "torch"
    module = "portable_attn.backends.torch.ops"
    platforms = frozenset(Platform) - {Platform.TPU}
    ops = ("attention", "paged_attention", "write_kv_cache")
    description = ("SDPA's kernels (CPU flash; elsewhere cuDNN / flash / memory-efficient, chosen explicitly) "
                   "over each sequence's visible rows and keys, a dense mask only where a window, bottom-right "
                   "causal band or block mask hides keys inside them; sinks from lse; paged caches gathered")
    float64 = False
    support = "portable_attn.backends.torch.support"  # plain Python: importing it launches nothing
    notes = {"paged_attention": "pages gathered, then SDPA", "write_kv_cache": "indexed assignment (index_put)"}
    limits = ("float64 (use reference); softcap; return_lse and sinks off the CPU; D != Dv on the CPU; masks "
              "above 2^26 elements per sequence (a window, bottom-right causal band or block mask as a dense mask)")


BACKEND = TorchBackend()
