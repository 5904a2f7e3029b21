"""Backends, one folder each; installed as `portable_attn.backends.*`. Never import as `backends`."""
