"""The one place bad input is stopped: SPEC's shape, dtype, device and index-value rules for every op.

Each ``check_<op>(a)`` takes the call's arguments as a dict and returns them normalised for backends
(scales resolved, windows as int pairs, default ``state_indices`` filled in). Shapes and dtypes are
checked on every call; index *values* only when `index_checks_enabled()` (eager mode).
"""
from __future__ import annotations

import contextvars
import math
import numbers

import numpy as np
import torch

from . import envs
from .masks import BlockMask

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32,)

# True while portable_attn.jax checks arrays traced by jax.jit: their values are unknown.
VALUES_UNKNOWN = contextvars.ContextVar("portable_attn_values_unknown", default=False)

# Axis names (as `tensor` is given them) that are sizes of the computation, never 0 (SPEC "Empty sizes");
# token, sequence, batch, slot, block and top-k counts may be 0.
SIZES = {"Hq": "head count", "Hkv": "kv head count", "H": "head count", "Hv": "value head count",
         "G": "group count", "D": "head dim", "Dv": "value head dim", "K": "key dim", "V": "value dim",
         "P": "head dim", "N": "state size", "C": "channel count", "W": "conv width", "BS": "block size"}


def index_checks_enabled(x: torch.Tensor | None = None) -> bool:
    """Index values are checked in eager mode, unless PORTABLE_ATTN_CHECK=0 (skipped while tracing)."""
    if not envs.PORTABLE_ATTN_CHECK:
        return False
    if torch.compiler.is_compiling() or VALUES_UNKNOWN.get():
        return False
    if x is not None and x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


# ---- tensor helpers ---------------------------------------------------------------------------

def _shape(x) -> str:
    return "(" + ", ".join(str(d) for d in x.shape) + ")"


def tensor(name: str, x, dims: str, *, dtypes=None, device=None):
    """`x` must be a tensor with len(dims.split()) axes (`dims` names them for the message)."""
    names = dims.split()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor [{', '.join(names)}], got {type(x).__name__}")
    if x.dim() != len(names):
        raise ValueError(f"{name}: expected a {len(names)}-D tensor [{', '.join(names)}], got shape {_shape(x)}")
    if dtypes is not None and x.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the inputs), got {x.device}")
    if 0 in x.shape:
        nonzero_sizes(name, x, names)
    return x


def nonzero_sizes(name: str, x, names: list) -> None:
    """The axes of `x` named in SIZES hold at least 1."""
    for axis, (what, n) in enumerate(zip(names, x.shape)):
        if n == 0 and what in SIZES:
            raise ValueError(f"{name}: the {SIZES[what]} {what} (axis {axis}) must be at least 1, got shape "
                             f"{_shape(x)}")


def dim(name: str, x, axis: int, expected: int, what: str) -> None:
    if x.shape[axis] != expected:
        raise ValueError(f"{name}: axis {axis} must be {what} = {expected}, got shape {_shape(x)}")


def activations(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Activations share the dtype of `ref`."""
    if ref.dtype not in ACT_DTYPES:
        raise TypeError(f"{ref_name}: expected dtype float32, float16, bfloat16 or float64, got "
                        f"{str(ref.dtype).replace('torch.', '')}")
    for name, x in others.items():
        if x is not None and x.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {str(ref.dtype).replace('torch.', '')} (the dtype of "
                            f"{ref_name}), got {str(x.dtype).replace('torch.', '')}")


def param_dtypes(act: torch.dtype) -> tuple:
    """Gates, parameters and states may be float32 whatever the activation dtype, or that dtype."""
    return (torch.float32, act) if act != torch.float32 else (torch.float32,)


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool (the fast path first: this runs on every call)."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def is_real(value) -> bool:
    """A Python or NumPy int or float, not a bool."""
    return type(value) in (float, int) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def positive_int(name: str, value) -> int | None:
    """A non-negative int or None, as a Python int."""
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int or None, got {value!r}")
    return int(value)


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")


def real(name: str, value, *, minimum: float | None = None) -> float:
    if not is_real(value) or not math.isfinite(value):
        raise TypeError(f"{name}: expected a finite float, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a value >= {minimum}, got {value!r}")
    return float(value)


def out_tensor(a: dict, shape: tuple, dtype: torch.dtype, device, dims: str) -> None:
    out = a.get("out")
    if out is None:
        return
    tensor("out", out, dims, dtypes=(dtype,), device=device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: expected shape ({', '.join(map(str, shape))}), got {_shape(out)}")
    no_overlap(a, out)


def _span(x: torch.Tensor) -> tuple:
    """[first, end) of the bytes `x` can touch (bounds of its strided view; `x` has elements)."""
    first = x.data_ptr()
    n = x.numel() if x.is_contiguous() else 1 + sum((d - 1) * s for d, s in zip(x.shape, x.stride()))
    return first, first + n * x.element_size()


def no_overlap(a: dict, out: torch.Tensor) -> None:
    """`out` shares no byte range with an input tensor (all on one device): a kernel would read what it wrote."""
    if out.numel() == 0:
        return
    lo, hi = _span(out)
    for name, x in a.items():
        if name != "out" and isinstance(x, torch.Tensor) and x.numel():
            xlo, xhi = _span(x)
            if xlo < hi and lo < xhi:
                raise ValueError(f"out: overlaps the memory of the input {name}; pass a separate tensor as out "
                                 f"(or out=None)")


# ---- index values -----------------------------------------------------------------------------

def host(*xs: torch.Tensor) -> list:
    """Index tensors as NumPy arrays for the value checks: views on the CPU; on a device, one copy of all of
    them to the host (one sync per call)."""
    if xs[0].device.type == "cpu":
        return [x.numpy() for x in xs]
    flat = torch.cat([x.reshape(-1).to(torch.int64) for x in xs]).cpu().numpy()
    ends = np.cumsum([x.numel() for x in xs])
    return [part.reshape(x.shape) for part, x in zip(np.split(flat, ends[:-1]), xs)]


def cu_seqlens(name: str, cu, device) -> torch.Tensor:
    tensor(name, cu, "S+1", dtypes=INDEX_DTYPES, device=device)
    if cu.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one entry (cu[0] = 0), got shape {_shape(cu)}")
    return cu


def cu_values(name: str, cu: np.ndarray, total: int) -> None:
    if cu[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {cu[0]}")
    if (cu[1:] < cu[:-1]).any():
        raise ValueError(f"{name}: must be non-decreasing, got {cu.tolist()}")
    if cu[-1] != total:
        raise ValueError(f"{name}: last entry must be the token count {total}, got {cu[-1]}")


def max_seqlen(name: str, value, cu: np.ndarray | None) -> int | None:
    """A non-negative int hint, at least the longest sequence of `cu` (host values, None when unchecked)."""
    value = positive_int(name, value)
    if value is not None and cu is not None and cu.shape[0] > 1:
        longest = int((cu[1:] - cu[:-1]).max())
        if value < longest:
            raise ValueError(f"{name}: {value} is shorter than the longest sequence ({longest})")
    return value


SMALL = 4096  # index arrays up to this size are reduced as Python lists (a NumPy reduction costs ~1.5 us)


def extent(idx: np.ndarray) -> tuple[int, int]:
    """(min, max) of a non-empty index array, as Python ints."""
    if idx.size > SMALL:
        return int(idx.min()), int(idx.max())
    values = idx.ravel().tolist()
    return min(values), max(values)


def within(idx: np.ndarray, high: int) -> bool:
    """Whether every value of a non-empty signed index array lies in [0, high): one reduction of its unsigned
    view, where a negative value is a huge one (a min and a max of a block table cost twice as much)."""
    return int(idx.view(_UNSIGNED[idx.dtype.itemsize]).max()) < high


_UNSIGNED = {4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}  # the index dtypes' unsigned views, by width


def index_range(name: str, idx: np.ndarray, low: int, high: int, what: str) -> tuple[int, int] | None:
    """Every value in [low, high); returns (min, max), None when `idx` is empty."""
    if idx.size == 0:
        return None
    lo, hi = extent(idx)
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise ValueError(f"{name}: {what} must lie in [{low}, {high}), got {bad}")
    return lo, hi


def no_duplicates(name: str, idx: np.ndarray, what: str) -> None:
    """No value other than -1 occurs twice along the last axis."""
    if idx.size == 0:
        return
    if idx.ndim == 1 and idx.size <= SMALL:  # the common case (a row list) without NumPy's fixed costs
        listed = [i for i in idx.tolist() if i >= 0]
        if len(set(listed)) == len(listed):
            return
    srt = np.sort(idx, axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if dup.any():
        where = np.argwhere(dup)[0].tolist()
        raise ValueError(f"{name}: {what} lists {int(srt[tuple(where[:-1]) + (where[-1] + 1,)])} twice")


# ---- recurrent states -------------------------------------------------------------------------

def states(a: dict, tail: tuple, tail_dims: str, nseq: int, device, state_dtypes: tuple) -> None:
    """initial_state / state_indices / has_initial_state of a sequence form, per SPEC's state rules."""
    init, idx, has = a["initial_state"], a["state_indices"], a["has_initial_state"]
    flag("output_final_state", a["output_final_state"])
    if idx is None:
        if has is not None:
            raise ValueError("has_initial_state: only meaningful with state_indices (a state cache)")
        if init is not None:
            tensor("initial_state", init, "S " + tail_dims, dtypes=state_dtypes, device=device)
            if tuple(init.shape) != (nseq,) + tail:
                raise ValueError(f"initial_state: expected shape ({', '.join(map(str, (nseq,) + tail))}), "
                                 f"got {_shape(init)}")
        return
    if init is None:
        raise ValueError("initial_state: state_indices needs a state cache in initial_state, got None")
    tensor("initial_state", init, "slots " + tail_dims, dtypes=state_dtypes, device=device)
    if tuple(init.shape[1:]) != tail:
        raise ValueError(f"initial_state: expected a cache [slots, {', '.join(map(str, tail))}], got {_shape(init)}")
    slot_indices("state_indices", idx, nseq, device)
    if has is not None:
        tensor("has_initial_state", has, "S", dtypes=(torch.bool,), device=device)
        dim("has_initial_state", has, 0, nseq, "the number of sequences")


def slot_indices(name: str, idx, nseq: int, device) -> None:
    tensor(name, idx, "S", dtypes=INDEX_DTYPES, device=device)
    dim(name, idx, 0, nseq, "the number of sequences")


def slot_values(name: str, idx: np.ndarray, slots: int) -> None:
    index_range(name, idx, -1, slots, "state cache rows (or -1)")
    no_duplicates(name, idx, "state cache rows")


def step_state(a: dict, tail: tuple, tail_dims: str, bsz: int, device, state_dtypes: tuple) -> bool:
    """The state cache of a step form; True when the caller gave `state_indices` (values to check)."""
    state = tensor("state", a["state"], "slots " + tail_dims, dtypes=state_dtypes, device=device)
    if tuple(state.shape[1:]) != tail:
        raise ValueError(f"state: expected a cache [slots, {', '.join(map(str, tail))}], got {_shape(state)}")
    if a["state_indices"] is None:
        if state.shape[0] < bsz:
            raise ValueError(f"state: without state_indices the cache needs at least bsz = {bsz} rows, "
                             f"got {state.shape[0]}")
        a["state_indices"] = default_rows(bsz, device)
        return False
    slot_indices("state_indices", a["state_indices"], bsz, device)
    return True


_ROWS: dict = {}  # bsz -> the CPU's default state_indices, shared: backends only read them
ROWS_KEPT = 1024  # bsz values kept


def default_rows(bsz: int, device) -> torch.Tensor:
    """The default state_indices of a step form, rows 0..bsz-1 (int32); one kept tensor per bsz on the CPU."""
    if device.type != "cpu":
        return torch.arange(bsz, dtype=torch.int32, device=device)
    rows = _ROWS.get(bsz)
    if rows is None:
        if len(_ROWS) >= ROWS_KEPT:
            _ROWS.clear()
        with torch.inference_mode(False):  # a normal tensor, whatever mode the first call ran in
            rows = _ROWS[bsz] = torch.arange(bsz, dtype=torch.int32)
    return rows


def sequences(a: dict, device) -> int:
    """Number of sequences of a recurrent sequence form (cu_seqlens or one)."""
    if a["cu_seqlens"] is None:
        return 1
    return cu_seqlens("cu_seqlens", a["cu_seqlens"], device).shape[0] - 1


def gate(name: str, g, lead: tuple, lead_dims: str, heads: int, kdim: int, act, device) -> None:
    """A log-decay gate [*lead, heads] or, per key dim, [*lead, heads, kdim]."""
    if g is None:
        return
    if isinstance(g, torch.Tensor) and g.dim() == len(lead) + 2:
        tensor(name, g, f"{lead_dims} H K", dtypes=param_dtypes(act), device=device)
        want = lead + (heads, kdim)
    else:
        tensor(name, g, f"{lead_dims} H", dtypes=param_dtypes(act), device=device)
        want = lead + (heads,)
    if tuple(g.shape) != want:
        raise ValueError(f"{name}: expected shape ({', '.join(map(str, want))}), got {_shape(g)}")


def scale(name: str, value, head_dim: int) -> float:
    """`value`, or 1/sqrt(head_dim) when None (the head dim is at least 1: `tensor` saw to it)."""
    return 1.0 / math.sqrt(head_dim) if value is None else real(name, value)


# ---- attention family -------------------------------------------------------------------------

def _attn_common(a: dict, q, lk_max: int | None, nseq: int) -> None:
    """Options shared by the attention ops; `lk_max` (longest key count) is None where it is unknown."""
    dev = q.device
    if "window_size" in a:  # not an option of sparse_attention
        ws = a["window_size"]
        if not (isinstance(ws, (tuple, list)) and len(ws) == 2
                and all(is_int(w) for w in ws)):
            raise TypeError(f"window_size: expected a pair of ints (left, right), got {ws!r}")
        if min(ws) < -1:
            raise ValueError(f"window_size: each side must be >= -1 (-1 = unbounded), got {tuple(ws)}")
        a["window_size"] = (int(ws[0]), int(ws[1]))
        flag("causal", a["causal"])
    flag("return_lse", a["return_lse"])
    a["softcap"] = real("softcap", a["softcap"], minimum=0.0)
    a["softmax_scale"] = scale("softmax_scale", a["softmax_scale"], q.shape[2])
    if a["sinks"] is not None:
        tensor("sinks", a["sinks"], "Hq", dtypes=param_dtypes(q.dtype), device=dev)
        dim("sinks", a["sinks"], 0, q.shape[1], "Hq")
    if a.get("block_mask") is not None:
        bm = a["block_mask"]
        if not isinstance(bm, BlockMask):
            raise TypeError(f"block_mask: expected a portable_attn.BlockMask, got {type(bm).__name__}")
        bm.check_for(nseq=nseq, heads=q.shape[1], max_len=lk_max, device=dev)


def attention_qkv(a: dict) -> tuple:
    """q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] of one dtype and device, Hkv dividing Hq."""
    q = tensor("q", a["q"], "Tq Hq D")
    k = tensor("k", a["k"], "Tk Hkv D", device=q.device)
    v = tensor("v", a["v"], "Tk Hkv Dv", device=q.device)
    activations("q", q, k=k, v=v)
    dim("k", k, 2, q.shape[2], "the head dim D of q")
    dim("v", v, 0, k.shape[0], "the token count Tk of k")
    dim("v", v, 1, k.shape[1], "the kv head count Hkv of k")
    gqa(q.shape[1], k.shape[1], "q", "k")
    return q, k, v


def cu_pair(a: dict, q, k, check: bool) -> tuple:
    """cu_seqlens_q and cu_seqlens_k: both or neither, with one sequence count; their host values when
    `check` (else None)."""
    cq, ck = a["cu_seqlens_q"], a["cu_seqlens_k"]
    if (cq is None) != (ck is None):
        raise ValueError("cu_seqlens_q / cu_seqlens_k: give both or neither "
                         f"(got cu_seqlens_q={'a tensor' if cq is not None else None}, "
                         f"cu_seqlens_k={'a tensor' if ck is not None else None})")
    if cq is None:
        return None, None
    cu_seqlens("cu_seqlens_q", cq, q.device)
    cu_seqlens("cu_seqlens_k", ck, q.device)
    if cq.shape[0] != ck.shape[0]:
        raise ValueError(f"cu_seqlens_k: expected {cq.shape[0]} entries like cu_seqlens_q, got {ck.shape[0]}")
    return cu_pair_values(a) if check else (None, None)


def cu_pair_values(a: dict) -> tuple:
    """The host values of cu_seqlens_q and cu_seqlens_k (both given, shapes checked), checked."""
    hq, hk = host(a["cu_seqlens_q"], a["cu_seqlens_k"])
    cu_values("cu_seqlens_q", hq, a["q"].shape[0])
    cu_values("cu_seqlens_k", hk, a["k"].shape[0])
    return hq, hk


def attention_values(a: dict):
    """The index values of an attention call with cu_seqlens whose shapes passed (the max_seqlen hints
    against them); cu_seqlens_k's host values."""
    hq, hk = cu_pair_values(a)
    max_seqlen("max_seqlen_q", a["max_seqlen_q"], hq)
    max_seqlen("max_seqlen_k", a["max_seqlen_k"], hk)
    return hk


def check_attention(a: dict) -> dict:
    q, k, v = attention_qkv(a)
    dev = q.device
    cu_pair(a, q, k, False)
    varlen = a["cu_seqlens_q"] is not None
    hk = attention_values(a) if varlen and index_checks_enabled(q) else None
    a["max_seqlen_q"] = positive_int("max_seqlen_q", a["max_seqlen_q"])
    a["max_seqlen_k"] = positive_int("max_seqlen_k", a["max_seqlen_k"])
    if varlen:
        nseq = a["cu_seqlens_q"].shape[0] - 1
        lk_max = int((hk[1:] - hk[:-1]).max()) if hk is not None and nseq else None
    else:
        nseq, lk_max = 1, k.shape[0]
    _attn_common(a, q, lk_max, nseq)
    out_tensor(a, (q.shape[0], q.shape[1], v.shape[2]), q.dtype, dev, "Tq Hq Dv")
    return a


def gqa(hq: int, hkv: int, qname: str, kname: str) -> None:
    if hq % hkv != 0:
        raise ValueError(f"{kname}: head count {hkv} must divide the {qname} head count {hq} (grouped heads)")


def check_paged_attention(a: dict) -> dict:
    q = tensor("q", a["q"], "Tq Hq D")
    dev = q.device
    kc = tensor("k_cache", a["k_cache"], "NB BS Hkv D", device=dev)
    vc = tensor("v_cache", a["v_cache"], "NB BS Hkv Dv", device=dev)
    activations("q", q, k_cache=kc, v_cache=vc)
    dim("k_cache", kc, 3, q.shape[2], "the head dim D of q")
    for axis, what in ((0, "the block count NB"), (1, "the block size BS"), (2, "the kv head count Hkv")):
        dim("v_cache", vc, axis, kc.shape[axis], what + " of k_cache")
    gqa(q.shape[1], kc.shape[2], "q", "k_cache")
    bt = tensor("block_table", a["block_table"], "S max_blocks", dtypes=INDEX_DTYPES, device=dev)
    su = tensor("seqused_k", a["seqused_k"], "S", dtypes=INDEX_DTYPES, device=dev)
    nseq = bt.shape[0]
    dim("seqused_k", su, 0, nseq, "the sequence count S of block_table")
    cu = a["cu_seqlens_q"]
    if cu is None:
        dim("q", q, 0, nseq, "one query per sequence (decode, no cu_seqlens_q): S")
    else:
        cu_seqlens("cu_seqlens_q", cu, dev)
        dim("cu_seqlens_q", cu, 0, nseq + 1, "S + 1 (S from block_table)")
    a["max_seqlen_k"] = positive_int("max_seqlen_k", a["max_seqlen_k"])
    lk_max = paged_values(a) if index_checks_enabled(q) else None
    a["max_seqlen_q"] = positive_int("max_seqlen_q", a["max_seqlen_q"])
    _attn_common(a, q, lk_max, nseq)
    out_tensor(a, (q.shape[0], q.shape[1], vc.shape[3]), q.dtype, dev, "Tq Hq Dv")
    return a


def paged_values(a: dict) -> int | None:
    """The index values of a paged_attention call whose shapes passed; the longest key count (None: no
    sequences)."""
    q, kc, bt, su, cu = a["q"], a["k_cache"], a["block_table"], a["seqused_k"], a["cu_seqlens_q"]
    nb, bs = kc.shape[0], kc.shape[1]
    hcu = least = lk_max = None
    if cu is None and bt.is_cpu and bt.numel() <= SMALL:  # decode's few values as lists: NumPy cost ~20 us cold
        lens, ids = su.tolist(), bt.tolist()
        if lens:
            least, lk_max = min(lens), max(lens)
        in_range = not ids or not ids[0] or (min(map(min, ids)) >= 0 and max(map(max, ids)) < nb)
    else:
        hsu, hbt, *hcu = host(su, bt, *([cu] if cu is not None else []))
        hcu = hcu[0] if hcu else None
        if hcu is not None:
            cu_values("cu_seqlens_q", hcu, q.shape[0])
        if hsu.size:
            least, lk_max = extent(hsu)
        in_range = not hbt.size or within(hbt, nb)
    if lk_max is not None:
        if least < 0 or lk_max > bt.shape[1] * bs:
            index_range("seqused_k", host(su)[0], 0, bt.shape[1] * bs + 1, f"key counts (block_table holds "
                        f"{bt.shape[1]} blocks of {bs})")
        if a["max_seqlen_k"] is not None and a["max_seqlen_k"] < lk_max:
            raise ValueError(f"max_seqlen_k: {a['max_seqlen_k']} is shorter than the longest sequence "
                             f"({lk_max})")
        if not in_range:  # some id out of range: check only the entries in use
            hsu, hbt = host(su, bt)
            used = np.arange(bt.shape[1])[None, :] * bs < hsu[:, None]
            index_range("block_table", hbt[used], 0, nb, "block ids in use")
    max_seqlen("max_seqlen_q", a["max_seqlen_q"], hcu)
    return lk_max


def check_write_kv_cache(a: dict) -> dict:
    k = tensor("k", a["k"], "T Hkv D")
    dev = k.device
    v = tensor("v", a["v"], "T Hkv Dv", device=dev)
    kc = tensor("k_cache", a["k_cache"], "NB BS Hkv D", device=dev)
    vc = tensor("v_cache", a["v_cache"], "NB BS Hkv Dv", device=dev)
    activations("k", k, v=v, k_cache=kc, v_cache=vc)
    dim("v", v, 0, k.shape[0], "the token count T of k")
    dim("v", v, 1, k.shape[1], "the kv head count Hkv of k")
    for axis, what in ((0, "the block count NB"), (1, "the block size BS")):
        dim("v_cache", vc, axis, kc.shape[axis], what + " of k_cache")
    dim("k_cache", kc, 2, k.shape[1], "the kv head count Hkv of k")
    dim("k_cache", kc, 3, k.shape[2], "the head dim D of k")
    dim("v_cache", vc, 2, k.shape[1], "the kv head count Hkv of k")
    dim("v_cache", vc, 3, v.shape[2], "the head dim Dv of v")
    sm = tensor("slot_mapping", a["slot_mapping"], "T", dtypes=(torch.int32, torch.int64), device=dev)
    dim("slot_mapping", sm, 0, k.shape[0], "the token count T of k")
    if index_checks_enabled(k):
        write_kv_values(a)
    return a


def write_kv_values(a: dict) -> None:
    """The slots of a write_kv_cache call whose shapes passed: in range (or -1), none twice."""
    (hsm,) = host(a["slot_mapping"])
    kc = a["k_cache"]
    index_range("slot_mapping", hsm, -1, kc.shape[0] * kc.shape[1], "cache slots (or -1)")
    no_duplicates("slot_mapping", hsm, "cache slots")


def sparse_values(a: dict) -> None:
    """The index values of a sparse_attention call whose shapes passed: the cu_seqlens pair, then each
    query's key positions in [-1, Lk) of its sequence, none twice."""
    q, k, idx = a["q"], a["k"], a["indices"]
    hq, hk = cu_pair_values(a) if a["cu_seqlens_q"] is not None else (None, None)
    if not idx.numel():
        return
    (hidx,) = host(idx)
    if hq is None:
        lk = np.full((q.shape[0],), k.shape[0])
    else:
        lk = np.repeat(hk[1:] - hk[:-1], hq[1:] - hq[:-1])
    bad = (hidx < -1) | (hidx >= lk[:, None, None])
    if bad.any():
        t, h, s = np.argwhere(bad)[0].tolist()
        raise ValueError(f"indices: key positions must lie in [-1, Lk) of the query's sequence; query {t}, "
                         f"kv head {h} lists {int(hidx[t, h, s])} with Lk = {int(lk[t])}")
    no_duplicates("indices", hidx, "one query's key positions")


def check_sparse_attention(a: dict) -> dict:
    q, k, v = attention_qkv(a)
    dev = q.device
    idx = tensor("indices", a["indices"], "Tq Hkv topk", dtypes=INDEX_DTYPES, device=dev)
    dim("indices", idx, 0, q.shape[0], "the query count Tq")
    dim("indices", idx, 1, k.shape[1], "the kv head count Hkv")
    cu_pair(a, q, k, False)
    if index_checks_enabled(q):
        sparse_values(a)
    _attn_common(a, q, None, 1)
    out_tensor(a, (q.shape[0], q.shape[1], v.shape[2]), q.dtype, dev, "Tq Hq Dv")
    return a


def check_merge_attention_states(a: dict) -> dict:
    """o_a, o_b [T, H, Dv] of one dtype, lse_a, lse_b float32 [H, T] (float64 beside float64 outputs)."""
    oa = tensor("o_a", a["o_a"], "T H Dv")
    dev = oa.device
    ob = tensor("o_b", a["o_b"], "T H Dv", device=dev)
    activations("o_a", oa, o_b=ob)
    if ob.shape != oa.shape:
        raise ValueError(f"o_b: expected the shape of o_a {_shape(oa)}, got {_shape(ob)}")
    lse_dtypes = (torch.float32, torch.float64) if oa.dtype == torch.float64 else (torch.float32,)
    for name in ("lse_a", "lse_b"):
        lse = tensor(name, a[name], "H T", dtypes=lse_dtypes, device=dev)
        if (lse.shape[0], lse.shape[1]) != (oa.shape[1], oa.shape[0]):
            raise ValueError(f"{name}: expected shape ({oa.shape[1]}, {oa.shape[0]}) = [H, T] of o_a, got "
                             f"{_shape(lse)}")
    if a["sinks"] is not None:
        tensor("sinks", a["sinks"], "H", dtypes=param_dtypes(oa.dtype), device=dev)
        dim("sinks", a["sinks"], 0, oa.shape[1], "the head count H of o_a")
    flag("return_lse", a["return_lse"])
    out_tensor(a, tuple(oa.shape), oa.dtype, dev, "T H Dv")
    return a


# ---- recurrent family -------------------------------------------------------------------------

def recurrent_qkv(a: dict, lead: str, v_heads: str) -> tuple:
    """q, k `[lead, H, K]` alike and v `[lead, v_heads, V]` with the same token count."""
    q = tensor("q", a["q"], f"{lead} H K")
    k = tensor("k", a["k"], f"{lead} H K", device=q.device)
    v = tensor("v", a["v"], f"{lead} {v_heads} V", device=q.device)
    activations("q", q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {_shape(q)}, got {_shape(k)}")
    dim("v", v, 0, q.shape[0], f"the token count {lead} of q")
    return q, k, v


def state_args(a: dict, x: torch.Tensor, tail: tuple, tail_dims: str, step: bool) -> None:
    """The state arguments of a sequence form (initial_state, ...) or of a step form (state=)."""
    pd = param_dtypes(x.dtype)
    if step:
        given = step_state(a, tail, tail_dims, x.shape[0], x.device, pd)
        cache, cu = a["state"], None
        idx = a["state_indices"] if given else None
    else:
        states(a, tail, tail_dims, sequences(a, x.device), x.device, pd)
        cache, cu, idx = a["initial_state"], a["cu_seqlens"], a["state_indices"]
    if (cu is None and idx is None) or not index_checks_enabled(x):
        return
    state_values(cu, idx, cache, x.shape[0])


def state_values(cu, idx, cache: torch.Tensor, n_tok: int) -> None:
    """cu_seqlens and the state_indices given (either may be None), their shapes checked, against the token
    count and the cache's rows."""
    values = host(*(t for t in (cu, idx) if t is not None))
    if cu is not None:
        cu_values("cu_seqlens", values[0], n_tok)
    if idx is not None:
        slot_values("state_indices", values[-1], cache.shape[0])


def recurrent_values(a: dict) -> None:
    """The index values of a recurrent call (sequence or step form) whose shapes passed."""
    step = "state" in a
    state_values(None if step else a["cu_seqlens"], a["state_indices"], a["state" if step else "initial_state"],
                 a["x" if "x" in a else "q"].shape[0])


def check_linear_attention(a: dict, step: bool = False) -> dict:
    lead = "bsz" if step else "T"
    q, k, v = recurrent_qkv(a, lead, "H")
    dev = q.device
    dim("v", v, 1, q.shape[1], "the head count H of q")
    a["scale"] = scale("scale", a["scale"], q.shape[2])
    gate("g", a["g"], (q.shape[0],), lead, q.shape[1], q.shape[2], q.dtype, dev)
    state_args(a, q, (q.shape[1], q.shape[2], v.shape[2]), "H K V", step)
    out_tensor(a, tuple(v.shape), q.dtype, dev, f"{lead} H V")
    return a


def check_gated_delta_rule(a: dict, step: bool = False) -> dict:
    lead = "bsz" if step else "T"
    q, k, v = recurrent_qkv(a, lead, "Hv")
    dev = q.device
    gqa(v.shape[1], q.shape[1], "v", "q")
    hv = v.shape[1]
    if a["g"] is None:
        raise TypeError("g: expected a log-decay tensor [T, Hv] or [T, Hv, K], got None (use zeros for DeltaNet)")
    gate("g", a["g"], (q.shape[0],), lead, hv, q.shape[2], q.dtype, dev)
    beta = tensor("beta", a["beta"], f"{lead} Hv", dtypes=param_dtypes(q.dtype), device=dev)
    if tuple(beta.shape) != (q.shape[0], hv):
        raise ValueError(f"beta: expected shape ({q.shape[0]}, {hv}), got {_shape(beta)}")
    flag("use_qk_l2norm", a["use_qk_l2norm"])
    a["scale"] = scale("scale", a["scale"], q.shape[2])
    state_args(a, q, (hv, q.shape[2], v.shape[2]), "Hv K V", step)
    out_tensor(a, tuple(v.shape), q.dtype, dev, f"{lead} Hv V")
    return a


def check_ssd(a: dict, step: bool = False) -> dict:
    lead = "bsz" if step else "T"
    x = tensor("x", a["x"], f"{lead} H P")
    dev = x.device
    n_tok, heads, p = x.shape
    pd = param_dtypes(x.dtype)
    dt = tensor("dt", a["dt"], f"{lead} H", dtypes=pd, device=dev)
    if tuple(dt.shape) != (n_tok, heads):
        raise ValueError(f"dt: expected shape ({n_tok}, {heads}), got {_shape(dt)}")
    A = tensor("A", a["A"], "H", dtypes=pd, device=dev)
    dim("A", A, 0, heads, "the head count H of x")
    B = tensor("B", a["B"], f"{lead} G N", device=dev)
    C = tensor("C", a["C"], f"{lead} G N", device=dev)
    activations("x", x, B=B, C=C, z=a["z"])
    dim("B", B, 0, n_tok, f"the token count {lead} of x")
    if C.shape != B.shape:
        raise ValueError(f"C: expected the shape of B {_shape(B)}, got {_shape(C)}")
    gqa(heads, B.shape[1], "x", "B")
    if a["D"] is not None:
        D = a["D"]
        if isinstance(D, torch.Tensor) and D.dim() == 2:
            tensor("D", D, "H P", dtypes=pd, device=dev)
            want = (heads, p)
        else:
            tensor("D", D, "H", dtypes=pd, device=dev)
            want = (heads,)
        if tuple(D.shape) != want:
            raise ValueError(f"D: expected shape ({', '.join(map(str, want))}), got {_shape(D)}")
    if a["z"] is not None:
        tensor("z", a["z"], f"{lead} H P", device=dev)
        if a["z"].shape != x.shape:
            raise ValueError(f"z: expected the shape of x {_shape(x)}, got {_shape(a['z'])}")
    if a["dt_bias"] is not None:
        tensor("dt_bias", a["dt_bias"], "H", dtypes=pd, device=dev)
        dim("dt_bias", a["dt_bias"], 0, heads, "the head count H of x")
    flag("dt_softplus", a["dt_softplus"])
    lim = a["dt_limit"]
    if not (isinstance(lim, (tuple, list)) and len(lim) == 2):
        raise TypeError(f"dt_limit: expected a pair (low, high), got {lim!r}")
    if not all(is_real(v) for v in lim):
        raise TypeError(f"dt_limit: expected a pair of floats (low, high), got {lim!r}")
    lo, hi = (float(v) for v in lim)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit: expected low <= high, got {tuple(lim)}")
    a["dt_limit"] = (lo, hi)
    state_args(a, x, (heads, p, B.shape[2]), "H P N", step)
    out_tensor(a, tuple(x.shape), x.dtype, dev, f"{lead} H P")
    return a


def check_causal_conv1d(a: dict, step: bool = False) -> dict:
    lead = "bsz" if step else "T"
    x = tensor("x", a["x"], f"{lead} C")
    dev = x.device
    w = tensor("weight", a["weight"], "C W", dtypes=param_dtypes(x.dtype), device=dev)
    activations("x", x)
    dim("weight", w, 0, x.shape[1], "the channel count C of x")
    if a["bias"] is not None:
        tensor("bias", a["bias"], "C", dtypes=param_dtypes(x.dtype), device=dev)
        dim("bias", a["bias"], 0, x.shape[1], "the channel count C of x")
    if a["activation"] not in (None, "silu"):
        raise ValueError(f"activation: expected None or 'silu', got {a['activation']!r}")
    state_args(a, x, (x.shape[1], w.shape[1] - 1), "C W-1", step)
    out_tensor(a, tuple(x.shape), x.dtype, dev, f"{lead} C")
    return a
