"""Bridges from model libraries to the portable_attn ops (each imports its library only when used)."""
