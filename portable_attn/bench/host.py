"""The `host` case: what a decode-sized call costs on top of the kernel it ends in.

For each point of `cases.host_case` (one op at the sizes of one model layer) every backend is timed as
  <backend>          the public op, checks on (PORTABLE_ATTN_CHECK=1),
  <backend> check=0  the same with PORTABLE_ATTN_CHECK=0 (set around the timed calls, not inside them),
  <backend> fn       the backend's own function on arguments already checked (`ops.make_call`),
and, on the CPU, beside the compiled kernel each op of the cpu backend ends in (`COMPILED`). A row's
overhead is measured against its `vs` row (that kernel for the cpu backend where there is one, else the
backend's own function) round by round: all rows of a point run round-robin, each sample `CALLS`
consecutive calls, and the overhead is the median over rounds of the row's sample minus the `vs` row's
sample of the same round (a shared machine's slow spells hit both). Rows whose `vs` is one function
(`_inner`) also measure it inside each call: while the point runs that function is wrapped by a timer, and
a row's in-call overhead is its sample minus the time spent inside it in the same calls and the timer's own
cost (measured on a no-op), exact where a multi-millisecond kernel's run-to-run spread hides tens of
microseconds between rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import time
import types

import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.table import Table

from portable_attn import checkmemo, registry
from portable_attn.ops import make_call

from . import cases, impls, timing
from .peers import heads_first

NAME = "host"
CHECK_VAR = checkmemo.CHECK_VAR  # the switch the remembered calls read
CALLS = 10      # consecutive calls per sample: a host cost of microseconds is timed over several
SLOW_S = 10e-3  # a call slower than this (interpreters) is sampled one at a time
NOTES = {
    "median_s": "seconds per call: the median over `repeat` samples of `calls_per_sample` consecutive calls, "
                "every row of a point sampled once per round, round-robin, after `warmup` rounds",
    "overhead_s": "the median over rounds of this row's sample - its `vs` row's sample of the same round (`vs`: the "
                  "kernel it ends in, else the backend's own function): binding, checks, backend selection and the "
                  "backend's wrapper work",
    "in_call_s": "the median over samples of this row's per-call time minus the time its calls spent inside the "
                 "`vs` function (wrapped by a timer while the point runs) minus the timer's own cost outside that "
                 "span (`timer_s` of the call, measured on a no-op in the same run); in_call_times_s: that "
                 "difference per sample",
    "check=0": "PORTABLE_ATTN_CHECK=0 while its samples run: index values are not checked",
    "clock": "on the CPU with one torch thread, the calling thread's CPU time (time.thread_time): all the work "
             "runs on that thread, and time spent descheduled on a shared machine is not counted; else wall time",
}

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_decode(args, sizes):
    """One query that sees every key, as the cpu backend's kernel call: the query heads of each kv head
    packed as rows of one head (backends/cpu/tiles.attend), on [1, H, L, D] views of the caller's
    token-major tensors (made in setup)."""
    q, k, v = (args[n].transpose(0, 1)[None] for n in "qkv")  # [1, H, L, D] views
    q = q.reshape(1, k.shape[1], -1, q.shape[-1])  # [1, Hkv, g, D]
    return functools.partial(_flash, q, k, v, 0.0, False, scale=q.shape[-1] ** -0.5)


def _sdpa_decode(args, sizes):
    q, k, v = (heads_first(args[n]) for n in "qkv")  # [1, H, L, D]
    return functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)


def _gather_flash(args, sizes):
    """The cpu backend's torch paged decode (PORTABLE_ATTN_CPU_NATIVE=0) of a batch that fits one gather, its
    index arithmetic done in setup: each sequence's keys and values copied token by token into buffers kept
    from setup (index_select; a sequence shorter than the longest padded with copies of its first key),
    then one kernel call, the padding masked by an additive bias built in setup."""
    q, k_cache, v_cache, table, used = (args[n] for n in ("q", "k_cache", "v_cache", "block_table", "seqused_k"))
    nseq, (nb, bs, hkv, d) = table.shape[0], k_cache.shape
    nk = -(-int(used.max()) // bs) * bs
    cols = torch.arange(nk)
    seen = cols < used.long()[:, None]  # [S, nk]
    pos = torch.where(seen, cols, 0)  # the padding reads the first key
    ids = (table.long().gather(1, pos // bs) * bs + pos % bs).flatten()
    bufs = [c.new_empty(ids.shape[0], hkv, c.shape[3]) for c in (k_cache, v_cache)]
    qg = q.view(nseq, hkv, -1, d)  # [S, Hkv, g, D]
    bias = torch.zeros(nseq, 1, 1, nk, dtype=q.dtype).masked_fill_(~seen[:, None, None], float("-inf"))

    def step():
        kt, vt = (torch.index_select(c.view(nb * bs, hkv, -1), 0, ids, out=buf).view(nseq, nk, hkv, -1)
                  .transpose(1, 2) for c, buf in zip((k_cache, v_cache), bufs))  # [S, Hkv, nk, D]
        return _flash(qg, kt, vt, 0.0, False, attn_mask=bias, scale=d ** -0.5)
    return step


# The compiled kernel each op of the cpu backend ends in: its source, the built module's entry, and the arguments
# the backend passes it, from a checked call's arguments `a` (no output given: the kernel makes it; no lse: the
# host case's calls want none).
COMPILED = {
    "attention": ("decode.cpp", "decode", lambda a: (
        a["q"], a["k"], a["v"], None, None, a["cu_seqlens_k"], None, a["softmax_scale"], -1, 0.0, None, False, -1)),
    "paged_attention": ("decode.cpp", "decode", lambda a: (
        a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["seqused_k"], None, None, a["softmax_scale"], -1, 0.0,
        None, False, -1 if a["max_seqlen_k"] is None else a["max_seqlen_k"])),
    "gated_delta_rule_step": ("recurrent.cpp", "delta_step", lambda a: (
        a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], a["state_indices"], a["scale"], a["use_qk_l2norm"],
        None)),
    "ssd_step": ("recurrent.cpp", "ssd_step", lambda a: (
        a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], a["dt_softplus"], a["dt_limit"][0],
        a["dt_limit"][1], a["state"], a["state_indices"], None)),
    "causal_conv1d_step": ("conv.cpp", "conv_step", lambda a: (
        a["x"], a["weight"], a["bias"], a["state"], a["state_indices"], a["activation"] == "silu", None)),
}


def _compiled(op: str) -> impls.Impl:
    """The row of the compiled kernel `op` ends in on the cpu backend, on arguments checked in setup."""
    source, entry, arguments = COMPILED[op]

    def prepare(args, sizes):
        from portable_attn.backends.cpu import native

        built = native.kernels()
        if built is None:
            raise impls.Refused("unavailable", "the cpu backend's compiled kernels are not built here (native.py)")
        return functools.partial(getattr(built, entry), *arguments(make_call(op, args).args))
    return impls.Impl(source, "kernel", f"the cpu backend's compiled kernel (backends/cpu/{source}, `{entry}`) as the "
                      "backend calls it", prepare)


def _compiled_entry(op: str):
    """(owner, attribute) of the compiled kernel's entry `op` ends in."""
    from portable_attn.backends.cpu import native
    return native.kernels(), COMPILED[op][1]


# Per op: the kernel the cpu backend ends in (its rows' `vs`), then kernels shown for comparison.
KERNELS = {
    "attention": (
        _compiled("attention"),
        impls.Impl("aten-flash", "kernel", "aten._scaled_dot_product_flash_attention_for_cpu on [1, Hkv, g, D] "
                   "query rows and [1, Hkv, Tk, D] views of the inputs: the cpu backend's one kernel call without "
                   "its compiled kernel (PORTABLE_ATTN_CPU_NATIVE=0)", _flash_decode),
        impls.Impl("sdpa", "peer", "F.scaled_dot_product_attention(enable_gqa=True) on [1, H, L, D] copies",
                   _sdpa_decode)),
    "paged_attention": (
        _compiled("paged_attention"),
        impls.Impl("gather+flash", "kernel", "index_select of each sequence's keys and values into buffers kept from "
                   "setup, then aten._scaled_dot_product_flash_attention_for_cpu with a padding mask built in setup",
                   _gather_flash),),
} | {op: (_compiled(op),) for op in ("gated_delta_rule_step", "ssd_step", "causal_conv1d_step")}


def _function(name: str, op: str) -> impls.Impl:
    def prepare(args, sizes):
        return functools.partial(getattr(registry.get(name).impl(), op), **make_call(op, args).args)
    return impls.Impl(f"{name} fn", "backend", f"the {name} backend's {op} function on arguments checked in setup "
                      "(ops.make_call): no binding, checks or selection", prepare)


def _inner(vs: str, op: str):
    """The function a `vs` row's work is, as (owner, attribute), for the in-call overhead: the compiled kernel's
    entry, or a backend's op function (the rows bind theirs in setup, so their own calls are not timed)."""
    if vs == COMPILED.get(op, (None,))[0]:
        return _compiled_entry(op)
    return registry.get(vs.removesuffix(" fn")).impl(), op


class Inside:
    """Seconds spent inside one function (on `clock`) while `wrapped` replaces it on its owner."""

    def __init__(self, owner, attr: str, clock):
        self.owner, self.attr, self.clock, self.seconds = owner, attr, clock, 0.0
        self.original = getattr(owner, attr)

    def timer(self, fn):
        """`fn` with the seconds of each call between two reads of the clock added to `seconds`."""
        clk = self.clock

        def timed(*args, **kwargs):
            t0 = clk()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += clk() - t0
        return timed

    @contextlib.contextmanager
    def wrapped(self):
        fn = self.original
        setattr(self.owner, self.attr, self.timer(fn))
        checkmemo.forget()  # remembered calls hold the op's function: they take the wrapper from here on
        try:
            yield self
        finally:
            setattr(self.owner, self.attr, fn)
            checkmemo.forget()


def timer_cost(clock, calls: int = 1000, repeat: int = 9) -> float:
    """Seconds per call that `Inside.timer` adds outside the span it measures (its frame, the parts of the two
    clock reads outside it: thread CPU time is a system call, about 0.5 us here): a no-op called through the
    timer, less the time inside, less the no-op called plainly; the median of `repeat` pairs."""
    def noop():
        return None
    probe = Inside(types.SimpleNamespace(noop=noop), "noop", clock)
    timed = probe.timer(noop)

    def plain():
        for _ in range(calls):
            noop()

    def through():
        for _ in range(calls):
            timed()
    costs = []
    for _ in range(repeat):
        base = timing.timed(plain, _no_sync, calls, clock)
        before = probe.seconds
        costs.append(timing.timed(through, _no_sync, calls, clock) - (probe.seconds - before) / calls - base)
    return statistics.median(costs)


def _no_sync():
    return None


@dataclasses.dataclass(frozen=True)
class Row:
    impl: impls.Impl
    checks: bool | None  # PORTABLE_ATTN_CHECK while it runs (None: as the process has it)
    vs: str | None       # the row its overhead is measured against


def groups(op: str, backends, device: str) -> list[list[Row]]:
    """The rows of one point in groups that stand or fall together: the kernels, then per backend its
    public op (checks on, off) and its function. The cpu backend is measured against its torch kernel."""
    kernels = KERNELS.get(op, ()) if device == "cpu" else ()
    out = [[Row(k, None, None)] for k in kernels]
    for name in backends:
        public = impls.backend(name, op)
        raw = kernels[0].name if name == "cpu" and kernels else f"{name} fn"
        out.append([Row(public, True, raw),
                    Row(dataclasses.replace(public, name=f"{name} check=0", what=public.what + ", CHECK=0"), False,
                        raw),
                    Row(_function(name, op), None, None if raw == f"{name} fn" else raw)])
    return out


@contextlib.contextmanager
def checks_env(on: bool | None):
    """PORTABLE_ATTN_CHECK set to 1 or 0 inside (None: left alone), restored after."""
    if on is None:
        yield
        return
    old = os.environ.get(CHECK_VAR)
    os.environ[CHECK_VAR] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[CHECK_VAR]
        else:
            os.environ[CHECK_VAR] = old


def clock(device: str):
    """The clock of the host case (NOTES["clock"]): thread CPU time where one thread does all the work."""
    return time.thread_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def _sampler(fn, sync, calls: int, checks: bool | None, clk, inside: Inside | None = None, in_call=None):
    """A sample's seconds per call; with `inside`, each sample's per-call seconds outside it appended to
    `in_call` too."""
    def loop():
        for _ in range(calls):
            fn()

    def sample() -> float:
        before = inside.seconds if inside else 0.0
        with checks_env(checks):
            seconds = timing.timed(loop, sync, calls, clk)
        if inside:
            in_call.append(seconds - (inside.seconds - before) / calls)
        return seconds
    return sample


def _start(row: Row, args: dict, sizes: dict, sync, entry: dict, clk, inside: Inside | None, in_call: list):
    """The row's sampler after its first call (setup) and three timed calls (the fastest sets the calls per
    sample: on a loaded machine any one of them can be far slower)."""
    with checks_env(row.checks):
        fn, entry["setup_s"] = impls.start(row.impl, args, sizes, sync)
        calls = CALLS if min(timing.timed(fn, sync) for _ in range(3)) < SLOW_S else 1
    entry["calls_per_sample"] = calls
    return _sampler(fn, sync, calls, row.checks, clk, inside, in_call)


def _point(case: cases.Case, point: cases.Point, settings, log) -> dict:
    op, sync, clk = point.x, timing.synchronizer(settings.device), clock(settings.device)
    args = case.make(point.sizes, settings.device)
    grouped = groups(op, settings.backends, settings.device)
    insides = {}
    for vs in {row.vs for group in grouped for row in group} - {None}:
        with contextlib.suppress(Exception):  # a backend that is not here: its rows report why below
            insides[vs] = Inside(*_inner(vs, op), clk)
    entries, times, in_calls = _sample(grouped, args, point, settings, sync, clk, insides)
    timer = timer_cost(clk) if insides else 0.0
    for e in entries.values():
        raw = entries.get(e["vs"])
        ok = e["status"] == "ok" and raw is not None and raw["status"] == "ok"
        e["overhead_s"] = _paired(times[e["name"]], times[e["vs"]]) if ok else None
        kept = [t - timer for t in in_calls[e["name"]][settings.warmup:]] if ok else []
        e["in_call_times_s"], e["in_call_s"] = kept, statistics.median(kept) if kept else None
    log("  " + ", ".join(f"{e['name']} {_us(e.get('median_s'))} us" if e["status"] == "ok"
                         else f"{e['name']} {e['status']}" for e in entries.values()))
    return dict(label=case.label(point), op=op, sizes=point.sizes, flops=case.flops(point.sizes), timer_s=timer,
                impls=list(entries.values()))


def _sample(grouped: list[list[Row]], args: dict, point, settings, sync, clk, insides: dict):
    """Every row of the point started, then sampled round-robin with the `insides` wrapped (after the rows bound
    their functions: a row's own function is not wrapped): (entries, times, in-call seconds) by row."""
    entries, samplers, impl_of, in_calls = {}, {}, {}, {}
    for group in grouped:
        for row in group:
            impl_of[row.impl.name], in_calls[row.impl.name] = row.impl, []
            entries[row.impl.name] = dict(name=row.impl.name, kind=row.impl.kind, checks=row.checks,
                                          what=row.impl.what, vs=row.vs, status="ok", reason=None)
        for row in group:
            try:
                samplers[row.impl.name] = _start(row, args, point.sizes, sync, entries[row.impl.name], clk,
                                                 insides.get(row.vs), in_calls[row.impl.name])
            except Exception as exc:  # noqa: BLE001 - the group's status: a backend that cannot run this op
                status, reason = impls.classify(exc, row.impl)
                for r in group:
                    samplers.pop(r.impl.name, None)
                    entries[r.impl.name].update(status=status, reason=reason)
                break
    with contextlib.ExitStack() as stack:
        for inside in insides.values():
            stack.enter_context(inside.wrapped())
        times, failed = timing.round_robin(samplers, settings.warmup, settings.repeat)
    for name, exc in failed.items():
        entries[name]["status"], entries[name]["reason"] = impls.classify(exc, impl_of[name])
    for name in samplers.keys() - failed.keys():
        entries[name].update(timing.summary(times[name]))
    return entries, times, in_calls


def _paired(row: list[float], vs: list[float]) -> float:
    """The median of the per-round differences of two rows sampled in the same rounds."""
    return statistics.median(a - b for a, b in zip(row, vs, strict=True))


def run(case: cases.Case, settings, log) -> dict:
    """The host case's result: its calls, one per point, the rows of each with medians and overheads.
    `points` is empty (nothing here is a series to plot or a peer to measure the memory of)."""
    calls = []
    for point in case.points:
        log(f"{case.name} {case.label(point)}")
        calls.append(_point(case, point, settings, log))
    return dict(name=case.name, kind=NAME, op=case.op, pattern=case.pattern, axis=case.axis, baseline=None,
                notes=NOTES, points=[], calls=calls,
                clock="thread CPU time" if clock(settings.device) is time.thread_time else "wall time")


def _us(seconds) -> str:
    if seconds is None:
        return "—"
    us = 1e6 * seconds
    return f"{us:.1f}" if abs(us) < 100 else f"{us:.0f}"


def _signed(seconds) -> str:
    return ("+" if seconds and seconds > 0 else "") + _us(seconds)


def _grid(case: dict) -> tuple[list[str], list[tuple[list[str], str, bool]]]:
    """Column names and rows (cells, status, last row of its call) of the host table."""
    cols = ["op", "impl", "median µs", "min µs", "IQR µs", "vs", "overhead µs", "in-call µs", "note"]
    rows = []
    for call in case["calls"]:
        for i, e in enumerate(call["impls"]):
            note = "" if e["status"] == "ok" else f"{e['status']}: {e['reason']}"
            over, inside = e.get("overhead_s"), e.get("in_call_s")
            rows.append(([call["op"] if i == 0 else "", e["name"], _us(e.get("median_s")), _us(e.get("min_s")),
                          _us(e.get("iqr_s")), e["vs"] or "", _signed(over), _signed(inside), note],
                         e["status"], i == len(call["impls"]) - 1))
    return cols, rows


CAPTION = ("overhead: the median over rounds of this row's sample - the `vs` row's sample of the same round; samples "
           "of consecutive calls, interleaved; in-call: the median over samples of this row's time per call minus "
           "the time its calls spent inside the `vs` function and the timer's own cost")


def _caption(case: dict) -> str:
    return f"{CAPTION}; clock: {case.get('clock', 'wall time')}"


def table(case: dict, styles: dict) -> Table:
    """The host case as a rich table; `styles` colours the note by status (report.STATUS_STYLE)."""
    cols, rows = _grid(case)
    t = Table(title=escape(f"{case['name']}: {case['pattern']}"), caption=escape(_caption(case)))
    for col in cols:
        t.add_column(col, justify="left" if col in ("op", "impl", "vs", "note") else "right", no_wrap=col != "note")
    for cells, status, last in rows:
        t.add_row(*map(escape, cells[:-1]), f"[{styles[status]}]{escape(cells[-1])}[/]", end_section=last)
    return t


def markdown(case: dict) -> list[str]:
    cols, rows = _grid(case)
    return [f"**{case['name']}**: {case['pattern']} ({_caption(case)})", "", "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols), *("| " + " | ".join(c.replace("|", "/") for c in cells) + " |"
                                        for cells, _, _ in rows), ""]
