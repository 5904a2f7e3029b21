"""Scale out: the ops with the sequence axis (context parallelism) split over the ranks of a torch.distributed
process group; `jax_attention` does the same over a JAX mesh with shard_map."""
from .context import context_attention, plan, received_tokens  # noqa: F401
from .layout import ContextLayout  # noqa: F401
