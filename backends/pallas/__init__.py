"""The pallas backend: the ops written with JAX and Pallas for TPUs (jax.experimental.pallas.tpu), run
in Pallas' TPU interpret mode on the CPU, by name, when PORTABLE_ATTN_INTERPRET=1. JAX-native: its jax
functions serve portable_attn.jax; the torch API reaches them through DLPack (bridge.py)."""
import importlib.util
import os
import sys

from portable_attn.backend import Backend
from portable_attn.platforms import Platform, machine_platforms
from portable_attn import envs


class PallasBackend(Backend):
    name = "pallas"
    module = "portable_attn.backends.pallas.ops"
    platforms = frozenset({Platform.TPU})
    array = "jax"
    description = ("Pallas TPU kernels: flash attention over the key tiles listed per query tile (scalar "
                   "prefetch), paged pages read in place, top-k gather; chunked recurrences (WY delta rule) "
                   "with the state in VMEM; conv1d and step forms as jitted JAX")
    float64 = False
    interpretable = True
    support = "portable_attn.backends.pallas.support"  # plain Python: importing it loads no kernel
    notes = {
        "sparse_attention": "keys gathered in XLA, then the kernel",
        "write_kv_cache": "jitted JAX scatter",
        "causal_conv1d": "jitted JAX",
        "merge_attention_states": "jitted JAX",
        **{op: "jitted JAX" for op in ("linear_attention_step", "gated_delta_rule_step", "ssd_step",
                                        "causal_conv1d_step")},
    }
    limits = ("float64 (use reference); attention head dims D or Dv above 256; block-mask blocks that are not "
              "multiples of 8 (the TPU's tiling); recurrent state dims above 512")

    def available(self) -> str | None:
        if importlib.util.find_spec("jax") is None:
            return "jax not installed (pip install 'portable-attn[tpu]', or '[pallas-interpret]' on a CPU)"
        if envs.PORTABLE_ATTN_INTERPRET or Platform.TPU in machine_platforms():
            return None
        return "no TPU here, and interpret mode is off (PORTABLE_ATTN_INTERPRET=1 runs the kernels on the CPU)"

    def impl(self):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # else JAX takes most of a GPU
        return super().impl()

    def release(self) -> None:
        if "jax" in sys.modules:  # nothing compiled yet otherwise
            sys.modules["jax"].clear_caches()


BACKEND = PallasBackend()
