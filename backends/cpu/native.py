"""The cpu backend's compiled kernels (decode.cpp, flash.cpp, softcap.cpp, recurrent.cpp, conv.cpp; bound in
kernels.cpp), built on first use with torch's C++ extension builder for the vector width of this machine and kept in
torch's extension cache (one build per machine and source). Where they cannot be built (no C++ compiler or ninja) or
PORTABLE_ATTN_CPU_NATIVE=0, `kernels()` is None, `decode` returns None and the callers take their torch paths; the
reason is logged once."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import re

import torch

from portable_attn import envs

from . import workspace

log = logging.getLogger("portable_attn")

SOURCES = [pathlib.Path(__file__).with_name(n)
           for n in ("kernels.cpp", "decode.cpp", "flash.cpp", "softcap.cpp", "recurrent.cpp", "conv.cpp")]
HEADERS = [pathlib.Path(__file__).with_name("vec.h")]  # included by the sources: hashed into the build's name with them
# Compiler flags per torch CPU capability: ATen's Vectorized<float> is as wide as the macros say.
FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


SWITCH = envs.key("PORTABLE_ATTN_CPU_NATIVE")


class _Switched(dict):
    """PORTABLE_ATTN_CPU_NATIVE's raw value -> the compiled module, None where it is switched off or cannot be
    built."""

    def __missing__(self, raw):
        self[raw] = built = _built() if envs.parse("PORTABLE_ATTN_CPU_NATIVE", raw) else None
        return built


# Every op of this backend asks for its kernels on every call (a decode step makes dozens): it reads
# `BUILT[lookup(SWITCH)]`, two C calls where the switch's value was seen before, no Python frame.
BUILT = _Switched()


def kernels():
    """The compiled module, or None where it is switched off or cannot be built (BUILT, for tests and tools)."""
    return BUILT[envs.lookup(SWITCH)]


def decode(q, k, v, sinks, scale: float, left: int, softcap: float, return_lse: bool, out, block_table=None,
           seqused_k=None, cu_seqlens_k=None, max_seqlen_k=None):
    """One query per sequence, q [S, Hq, D], at the position of its sequence's last key, seeing keys back to
    `left` before it (-1: all), by the compiled kernel: keys paged (caches [NB, BS, Hkv, D|Dv], block_table,
    seqused_k; their values and max_seqlen_k checked first, IndexError before any write) or packed (k/v
    [T, Hkv, D|Dv], cu_seqlens_k; None: one sequence). o [S, Hq, Dv] (into `out` when given) and lse [Hq, S] as
    the op returns them, or None where the kernel is not built."""
    built = BUILT[envs.lookup(SWITCH)]
    if built is None:
        return None
    o, lse = built.decode(q, k, v, block_table, seqused_k, cu_seqlens_k, sinks, scale, left, softcap, out,
                          return_lse, -1 if max_seqlen_k is None else min(max_seqlen_k, 1 << 62))
    return (o, lse) if return_lse else o


def flash(q, k, v, opts, return_lse: bool, out, cu_seqlens_q=None, cu_seqlens_k=None):
    """Attention over packed sequences (q [Tq, Hq, D], k/v [Tk, Hkv, D|Dv], cu_seqlens int32 [S + 1] or None: one
    sequence) by the compiled flash kernel: causal, window, softcap, sinks and block mask (`opts`: attention.Options).
    o [Tq, Hq, Dv] (into `out` when given) and lse [Hq, Tq] as the op returns them, or None where the kernel is not
    built."""
    built = BUILT[envs.lookup(SWITCH)]
    if built is None:
        return None
    bm = opts.block_mask
    mask = {} if bm is None else dict(layout=bm.layout, partial_index=bm.partial_index,
                                      partial_masks=bm.partial_masks, block_size=bm.block_size)
    o, lse = built.flash(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=opts.causal,
                         left=opts.window[0], right=opts.window[1], scale=opts.scale, softcap=float(opts.softcap),
                         sinks=opts.sinks, out=out, want_lse=return_lse, keep_bytes=workspace.KEEP_BYTES, **mask)
    return (o, lse) if return_lse else o


@functools.cache
def _built():
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    # one build per vector width, torch release and source (venvs of two torch versions, or two releases of this
    # package, share torch's cache folder: one name for both would rebuild it at each switch)
    source = hashlib.sha1(b"".join(f.read_bytes() for f in SOURCES + HEADERS)).hexdigest()[:10]
    name = re.sub(r"\W", "_", f"portable_attn_cpu_{capability.lower()}_torch{torch.__version__}_{source}")
    try:
        where = cpp_extension._get_build_directory(name, verbose=False)  # torch's own folder for it (made if new)
    except AttributeError:  # a private helper of torch's builder: without it, no first-build warning
        where = None
    if where is not None and not os.path.exists(os.path.join(where, f"{name}.so")):  # say why this call waits
        log.warning("portable_attn: building the cpu backend's kernels for %s in %s (once per machine and "
                    "source, about a minute on 2 cores)", capability, where)
    try:
        flags = ["-O3", "-fopenmp", *FLAGS.get(capability, [])]
        return cpp_extension.load(name=name, sources=[str(f) for f in SOURCES], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, no ninja, a failed build
        log.warning("portable_attn: the cpu backend's compiled kernels are unavailable (%s); attention, decode, "
                    "softcap, the recurrences and conv1d take their torch paths. Install a C++ compiler and ninja to "
                    "build them.",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
