"""The rank harness the distributed tests use (it lives in the package: the distributed benchmark spawns ranks too)."""
from portable_attn.distributed.ranks import run_ranks  # noqa: F401
