"""The ipex backend (opt-in, never a default): Intel Extension for PyTorch 2.8's kernels where they compute
SPEC exactly. IPEX is archived upstream (2.8 is its last release) and installs only beside torch 2.8,
so it lives in a virtual environment of its own; the kernel module imports it on the first call."""
import importlib.util

import torch

from portable_attn.backend import Backend
from portable_attn.platforms import Platform

PIN = "2.8"  # the torch release IPEX 2.8 is built against (it refuses any other)


class IpexBackend(Backend):
    name = "ipex"
    module = "portable_attn.backends.ipex.ops"
    platforms = frozenset({Platform.CPU})  # IPEX's XPU build (2.8.10+xpu) is a different wheel, not run here yet
    ops = ("attention", "paged_attention", "write_kv_cache", "causal_conv1d_step")
    description = ("IPEX 2.8 (archived upstream; opt-in): varlen_attention, PagedAttention decode and "
                   "reshape_and_cache on its heads-major cache [NB, Hkv, BS, D], MambaMixer.causal_conv1d_update")
    float64 = False
    support = "portable_attn.backends.ipex.support"  # plain Python: importing it does not import IPEX
    limits = ("return_lse, sinks, softcap, windows, block masks; causal attention with Lq != Lk (its causal "
              "mask is top-left); paged prefill; caches not laid out heads-major; ssd_step (its "
              "selective_state_update disagreed with SPEC here); the other recurrent ops (none in IPEX 2.8)")

    def available(self) -> str | None:
        if importlib.util.find_spec("intel_extension_for_pytorch") is None:
            return (f"intel-extension-for-pytorch not installed (archived upstream; its last release needs "
                    f"torch=={PIN}.0: pip install torch=={PIN}.0 intel-extension-for-pytorch=={PIN}.0 in a venv "
                    f"of its own)")
        version = torch.__version__.split("+")[0]
        if not version.startswith(PIN + "."):
            return f"IPEX {PIN} needs torch {PIN}, this is torch {version} (IPEX is archived: no newer release)"
        return None


BACKEND = IpexBackend()
