"""Scale out over torch.distributed (README "Scale out"): context-parallel attention (`context`), sequence-parallel
recurrent prefill and conv1d boundaries (`recurrent`, `conv`), tensor-parallel head shards (`tensor`);
`jax_attention` and `jax_recurrent` do the same over a JAX mesh with shard_map."""
from . import recurrent, tensor
from .context import context_attention, plan, received_tokens
from .conv import causal_conv1d
from .layout import ContextLayout
from .recurrent import Part, split_packed
from .tensor import HeadShard, shard_heads

__all__ = ["ContextLayout", "HeadShard", "Part", "causal_conv1d", "context_attention", "plan", "received_tokens",
           "recurrent", "shard_heads", "split_packed", "tensor"]
