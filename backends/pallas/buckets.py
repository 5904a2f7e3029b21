"""Shape buckets: every call reaches the jitted kernels with its sizes padded up a fixed ladder, so that
a process compiles a bounded set of executables however ragged its batches (as TPU serving engines do;
XLA compiles one executable per exact shape and JAX keeps them all). Token counts, sequence counts,
step batches, block-table widths and top-k widths are padded; the true lengths travel as data.

Padding never reaches a result: padded sequences are empty (`cu_seqlens` repeats its last entry,
`seqused_k` 0, `state_indices` -1, `has_initial_state` False), padded tokens lie past `cu_seqlens[-1]`
and are sliced off the outputs, padded `slot_mapping` and `indices` entries are -1, padded block-table
columns are never reached below `seqused_k`. Caches are never padded (they are updated in place).
Works on torch tensors (the torch bridge pads before DLPack: nothing to compile) and on jax arrays (the
JAX front; a pad is skipped when a size already sits on the ladder).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

MIN_TOKENS = 8
TOKENS = ("q", "k", "v", "g", "beta", "x", "dt", "B", "C", "z")   # token (or step batch) rows
SEQUENCE_FORMS = ("linear_attention", "gated_delta_rule", "ssd", "causal_conv1d")


def size(n: int, minimum: int = 1) -> int:
    """The bucket of a count n: a power of two (at least `minimum`) up to 256; above, the next multiple of
    an eighth of the next power of two (four sizes an octave, under 25% padding)."""
    top = 1 << (max(n, minimum, 1) - 1).bit_length()
    if top <= 256:
        return top
    step = top // 8
    return -(-n // step) * step


def pad(x, n: int, axis: int = 0, value=0):
    """x with `axis` padded to n entries of `value` ("edge": the last entry repeated); x itself when it
    has n already (or is None)."""
    if x is None or x.shape[axis] >= n:
        return x
    extra = n - x.shape[axis]
    if isinstance(x, torch.Tensor):
        shape = list(x.shape)
        shape[axis] = extra
        fill = x.narrow(axis, x.shape[axis] - 1, 1).expand(shape) if value == "edge" else x.new_full(shape, value)
        return torch.cat([x, fill], axis)
    import jax.numpy as jnp

    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode="edge") if value == "edge" else jnp.pad(x, widths, constant_values=value)


def _ints(like, values):
    """`values` as an int32 array of the same kind (torch or jax) as `like`, put there without compiling."""
    values = np.asarray(values, np.int32)
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(values).to(like.device)
    import jax.numpy as jnp

    return jnp.asarray(values)


def _hint(n):
    return None if n is None else size(n)


@dataclasses.dataclass(frozen=True)
class Cut:
    """How to slice the padding off the outputs: `t` output rows (tokens or the step batch), `s` sequences."""
    t: int
    s: int

    def tokens(self, x):
        return x if x.shape[0] == self.t else x[:self.t]

    def lse(self, x):
        return x if x.shape[1] == self.t else x[:, :self.t]

    def states(self, x):
        return x if x is None or x.shape[0] == self.s else x[:self.s]


def _attention(a: dict) -> Cut:
    q, k = a["q"], a["k"]
    tq, tk = q.shape[0], k.shape[0]
    if a["cu_seqlens_q"] is None:                          # one sequence: its true lengths become data
        a.update(cu_seqlens_q=_ints(q, [0, tq]), cu_seqlens_k=_ints(q, [0, tk]))
        if "max_seqlen_q" in a:
            a.update(max_seqlen_q=tq, max_seqlen_k=tk)
    nseq = a["cu_seqlens_q"].shape[0] - 1
    sb, tkb = size(nseq), size(tk, MIN_TOKENS)
    a.update(q=pad(q, size(tq, MIN_TOKENS)), k=pad(k, tkb), v=pad(a["v"], tkb),
             cu_seqlens_q=pad(a["cu_seqlens_q"], sb + 1, value="edge"),
             cu_seqlens_k=pad(a["cu_seqlens_k"], sb + 1, value="edge"))
    if "indices" in a:                                     # sparse: -1 slots see nothing
        idx = pad(a["indices"], size(tq, MIN_TOKENS), value=-1)
        a["indices"] = pad(idx, size(idx.shape[2]), axis=2, value=-1)
    else:
        a.update(max_seqlen_q=_hint(a["max_seqlen_q"]), max_seqlen_k=_hint(a["max_seqlen_k"]))
    return Cut(tq, nseq)


def _paged(a: dict) -> Cut:
    q, table = a["q"], a["block_table"]
    nseq = table.shape[0]
    sb = size(nseq)
    decode = a["cu_seqlens_q"] is None                     # one query per sequence: q rows are sequences
    a.update(q=pad(q, sb if decode else size(q.shape[0], MIN_TOKENS)),
             block_table=pad(pad(table, sb), size(table.shape[1]), axis=1), seqused_k=pad(a["seqused_k"], sb),
             max_seqlen_q=_hint(a["max_seqlen_q"]), max_seqlen_k=_hint(a["max_seqlen_k"]))
    if not decode:
        a["cu_seqlens_q"] = pad(a["cu_seqlens_q"], sb + 1, value="edge")
    return Cut(q.shape[0], nseq)


def _rows(a: dict, n: int) -> None:
    for name in TOKENS:
        if a.get(name) is not None:
            a[name] = pad(a[name], n)


def _sequence(a: dict) -> Cut:
    first = a["q"] if "q" in a else a["x"]
    t = first.shape[0]
    if a["cu_seqlens"] is None:
        a["cu_seqlens"] = _ints(first, [0, t])
    nseq = a["cu_seqlens"].shape[0] - 1
    sb = size(nseq)
    _rows(a, size(t, MIN_TOKENS))
    a["cu_seqlens"] = pad(a["cu_seqlens"], sb + 1, value="edge")
    if a["state_indices"] is not None:
        a.update(state_indices=pad(a["state_indices"], sb, value=-1),
                 has_initial_state=pad(a["has_initial_state"], sb, value=False))
    else:
        a["initial_state"] = pad(a["initial_state"], sb)
    return Cut(t, nseq)


def _step(a: dict) -> Cut:
    first = a["q"] if "q" in a else a["x"]
    bsz = first.shape[0]
    rows = a["state_indices"]
    if rows is None:                                       # the default rows, made explicit to pad them
        rows = _ints(first, np.arange(bsz))
    _rows(a, size(bsz))
    a["state_indices"] = pad(rows, size(bsz), value=-1)
    return Cut(bsz, bsz)


def _write(a: dict) -> Cut:
    t = a["k"].shape[0]
    n = size(t, MIN_TOKENS)
    a.update(k=pad(a["k"], n), v=pad(a["v"], n), slot_mapping=pad(a["slot_mapping"], n, value=-1))
    return Cut(t, 0)


def _merge(a: dict) -> Cut:
    t = a["o_a"].shape[0]
    n = size(t, MIN_TOKENS)                                # padded rows: empty parts (lse -inf), cut off
    a.update(o_a=pad(a["o_a"], n), o_b=pad(a["o_b"], n), lse_a=pad(a["lse_a"], n, axis=1, value=-np.inf),
             lse_b=pad(a["lse_b"], n, axis=1, value=-np.inf))
    return Cut(t, 0)


def bucket(op: str, args: dict) -> tuple[dict, Cut]:
    """The op's arguments padded to buckets (a new dict), and how to cut its outputs back."""
    a = dict(args)
    if op in ("attention", "sparse_attention"):
        return a, _attention(a)
    if op == "paged_attention":
        return a, _paged(a)
    if op == "write_kv_cache":
        return a, _write(a)
    if op == "merge_attention_states":
        return a, _merge(a)
    if op.endswith("_step"):
        return a, _step(a)
    assert op in SEQUENCE_FORMS, op
    return a, _sequence(a)
