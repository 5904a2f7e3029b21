"""Scale out: sequence-parallel recurrent prefill, conv1d boundaries and tensor-parallel head shards over
torch.distributed (README "Scale out")."""
from . import recurrent, tensor
from .conv import causal_conv1d
from .recurrent import Part, split_packed
from .tensor import HeadShard, shard_heads

__all__ = ["HeadShard", "Part", "causal_conv1d", "recurrent", "shard_heads", "split_packed", "tensor"]
