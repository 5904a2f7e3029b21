"""Sequence-parallel prefill of the recurrent ops over torch.distributed.

Each rank holds a contiguous part of every packed sequence (rank order = sequence order; a part may be
empty) and calls the public op on it from a zero state. The map from a part's initial state S0 to its
final state is affine, `S_T = M S0 + B`; the ranks combine their (M, B) summaries with a prefix scan
over ranks (log2(world) + 1 point-to-point rounds of one summary each: communication proportional to
the state size, never to the sequence), which gives each rank the true state at the start of its part,
and each rank adds what that state contributes to its outputs:

- `linear_attention` (no decay, scalar or per-key-dim decays) and `ssd`: M is diagonal,
  `exp(sum of log-decays)`, so the contribution is `q_t diag(exp(cum_t)) S0` (SSD: `exp(cum_t) S0 C_t`,
  gated by `silu(z_t)`): one scan plus one `[K] x [K, V]` product per token.
- `gated_delta_rule`: M is a dense `K x K` product of `alpha_t (I - beta_t k_t k_t^T)`. The state's
  columns evolve independently, so one call on widened values `[v, 0]` from the state `[0, I]` returns
  `[B, M]` as its final state and `scale M_t^T q_t` as its extra outputs, from which the contribution
  is one `[K] x [K, V]` product per token: one scan `(V + K) / V` times as wide, no rerun.

Decays are summed inside each sequence's own slice, never as differences of long cumulative sums
(docs/spec.md, strong decays).
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.distributed as dist

from .. import ops


@dataclasses.dataclass(frozen=True)
class Part:
    """One rank's slice of a packed batch: tokens [start, stop) and their own cu_seqlens (int32 [S+1])."""
    start: int
    stop: int
    cu_seqlens: torch.Tensor


def split_packed(cu_seqlens: torch.Tensor | None, total: int, world: int) -> list[Part]:
    """Split a packed batch of `total` tokens into `world` contiguous, equally long parts.

    A sequence crossing a part boundary is split there; every part keeps all S sequences (some with
    zero tokens), as the sequence-parallel ops require.
    """
    cu = (torch.tensor([0, total]) if cu_seqlens is None else cu_seqlens.to("cpu", torch.int64))
    parts = []
    for r in range(world):
        a, b = r * total // world, (r + 1) * total // world
        parts.append(Part(a, b, (cu.clamp(a, b) - a).to(torch.int32)))
    return parts


def _group_rank(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _exchange(send: tuple | None, to: int | None, like: tuple, frm: int | None, group) -> tuple | None:
    """Send `send` to rank `to` and receive a tuple shaped like `like` from rank `frm` (either may be None)."""
    bufs = [t.contiguous() for t in send] if to is not None else []
    reqs = [dist.isend(t, _peer(group, to), group=group) for t in bufs]
    got = None
    if frm is not None:
        got = tuple(torch.empty_like(t) for t in like)
        for t in got:
            dist.recv(t, _peer(group, frm), group=group)
    for req in reqs:
        req.wait()
    return got


def scan_ranks(summary: tuple, compose, group=None, stats: dict | None = None) -> tuple | None:
    """Exclusive prefix over ranks: rank r gets `compose` of the summaries of ranks 0..r-1 (None on rank 0).

    `compose(earlier, later)` combines two summaries (tuples of tensors of one shape on every rank).
    A shift then a Hillis-Steele scan: ceil(log2(world)) + 1 rounds, each rank sending at most one
    summary per round. `stats`, when given, gets `bytes_sent`, `rounds`, `summary_bytes` and `exchange_s`
    (seconds in this function, waiting for slower ranks included) added.
    """
    t0 = time.perf_counter()
    rank, world = _group_rank(group)
    nbytes = sum(t.numel() * t.element_size() for t in summary)
    sent = 0

    def step(send, to, frm):
        nonlocal sent
        to = to if send is not None and to < world else None
        sent += nbytes if to is not None else 0
        return _exchange(send, to, summary, frm, group)

    agg = step(summary, rank + 1, rank - 1 if rank >= 1 else None)  # the shift: rank r holds summary r-1
    d, rounds = 1, 1
    while d < world:  # rank 0 holds the identity: it sends nothing and nobody waits for it
        got = step(agg, rank + d, rank - d if rank - d >= 1 else None)
        if got is not None:
            agg = compose(got, agg)
        d, rounds = 2 * d, rounds + 1
    if stats is not None:
        stats["bytes_sent"] = stats.get("bytes_sent", 0) + sent
        stats["rounds"] = stats.get("rounds", 0) + rounds
        stats["summary_bytes"] = stats.get("summary_bytes", 0) + nbytes
        stats["exchange_s"] = stats.get("exchange_s", 0.0) + time.perf_counter() - t0
    return agg


# ---- affine summaries (M, B): S_out = M S_in + B, M diagonal (broadcast over the state) or dense [K, K]

def _apply(M: torch.Tensor, S: torch.Tensor, dense: bool) -> torch.Tensor:
    return M @ S if dense else M * S


def _incoming(summary: tuple, dense: bool, initial_state, group, stats) -> torch.Tensor | None:
    """The true state at the start of this rank's parts [S, H, ., .] (float32), or None for zeros."""
    prefix = scan_ranks(summary, lambda e, l: (_apply(l[0], e[0], dense), _apply(l[0], e[1], dense) + l[1]),
                        group, stats)
    init = None if initial_state is None else initial_state.float()
    if prefix is None:
        return init
    M, B = prefix
    return B if init is None else _apply(M, init, dense) + B


def _finish(summary: tuple, S_in, dense: bool, output_final_state: bool, initial_dtype):
    if not output_final_state:
        return None
    M, B = summary
    fin = B if S_in is None else _apply(M, S_in, dense) + B
    return fin.to(initial_dtype or torch.float32)


def _spans(cu: torch.Tensor | None, total: int):
    """(sequence index, start, stop) of each non-empty sequence of a packed batch."""
    bounds = [0, total] if cu is None else cu.tolist()
    return [(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]


def _decay_products(log_decay: torch.Tensor | None, cu, S: int, H: int, device) -> torch.Tensor:
    """Diagonal M [S, H, K or 1, 1]: exp of each sequence's summed log-decays `[T, H]` or `[T, H, K]`,
    summed in the sequence's own slice (ones without decay)."""
    width = 1 if log_decay is None or log_decay.dim() == 2 else log_decay.shape[2]
    M = torch.ones(S, H, width, 1, dtype=torch.float32, device=device)
    for i, a, b in ([] if log_decay is None else _spans(cu, log_decay.shape[0])):
        M[i] = log_decay[a:b].float().sum(0).exp().reshape(H, width, 1)
    return M


def _cum_decay(log_decay: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """exp of the running sums of log-decays over tokens a..b-1 of one sequence: [L, H, K or 1]."""
    lg = log_decay[a:b].float()
    return lg.reshape(b - a, lg.shape[1], -1).cumsum(0).exp()


def _add(out: torch.Tensor, a: int, b: int, corr: torch.Tensor) -> None:
    out[a:b] = (out[a:b].float() + corr).to(out.dtype)


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     group=None, backend=None, stats=None):
    """Sequence-parallel `portable_attn.linear_attention` (linear attention, RetNet, simple GLA, GLA).

    Every rank calls it with its own part of each sequence, in rank order: `q, k [T_r, H, K]`,
    `v [T_r, H, V]`, `g [T_r, H]` or `[T_r, H, K]`, `cu_seqlens` int32 [S+1] over its part (the same S on
    every rank; `split_packed` makes them). `initial_state [S, H, K, V]` (or None) is the state before
    the first part, the same on every rank.

    Returns `(out [T_r, H, V], final_state)`: the outputs of this rank's tokens, and with
    `output_final_state` the state at the end of this rank's part of each sequence [S, H, K, V] (the
    last rank's is every sequence's final state). `backend` picks the op's backend; `stats`, a dict,
    gets the bytes this rank sent. Example: tests/distributed/test_recurrent.py.
    """
    K = q.shape[-1]
    scale = 1.0 / math.sqrt(K) if scale is None else float(scale)
    out, B = ops.linear_attention(q, k, v, g=g, scale=scale, output_final_state=True, cu_seqlens=cu_seqlens,
                                  backend=backend)
    summary = (_decay_products(g, cu_seqlens, B.shape[0], B.shape[1], B.device), B)
    S_in = _incoming(summary, False, initial_state, group, stats)
    if S_in is not None:
        for i, a, b in _spans(cu_seqlens, q.shape[0]):
            w = scale * q[a:b].float()                                    # [L, H, K]
            if g is not None:
                w = w * _cum_decay(g, a, b)
            _add(out, a, b, torch.einsum("lhk,hkv->lhv", w, S_in[i]))
    return out, _finish(summary, S_in, False, output_final_state, None if initial_state is None
                        else initial_state.dtype)


def _ssd_log_decay(dt, A, dt_bias, dt_softplus, dt_limit) -> torch.Tensor:
    """d_t A [T, H] in float32, with d_t = clamp(f(dt + dt_bias), dt_limit) as docs/spec.md defines it."""
    d = dt.float() + (0.0 if dt_bias is None else dt_bias.float())
    if dt_softplus:
        d = torch.logaddexp(d, torch.zeros_like(d))
    return d.clamp(float(dt_limit[0]), float(dt_limit[1])) * A.float()


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
        initial_state=None, output_final_state=False, cu_seqlens=None, group=None, backend=None, stats=None):
    """Sequence-parallel `portable_attn.ssd` (Mamba-2): arguments and results as `linear_attention` above,
    with `x [T_r, H, P]`, `dt [T_r, H]`, `B, C [T_r, G, N]`, `z [T_r, H, P]` this rank's part, `A, D,
    dt_bias` the layer's parameters and states `[S, H, P, N]`."""
    y, Bs = ops.ssd(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                    output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)
    log_decay = _ssd_log_decay(dt, A, dt_bias, dt_softplus, dt_limit)          # [T, H]
    summary = (_decay_products(log_decay, cu_seqlens, Bs.shape[0], Bs.shape[1], Bs.device), Bs)
    S_in = _incoming(summary, False, initial_state, group, stats)
    if S_in is not None:
        H, G = x.shape[1], C.shape[1]
        for i, a, b in _spans(cu_seqlens, x.shape[0]):
            Ch = C[a:b].float().repeat_interleave(H // G, dim=1)               # [L, H, N]
            corr = torch.einsum("hpn,lhn->lhp", S_in[i], Ch) * _cum_decay(log_decay, a, b)
            if z is not None:
                corr = corr * torch.nn.functional.silu(z[a:b].float())
            _add(y, a, b, corr)
    return y, _finish(summary, S_in, False, output_final_state, None if initial_state is None
                      else initial_state.dtype)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm=False, group=None, backend=None, stats=None):
    """Sequence-parallel `portable_attn.gated_delta_rule` (Gated DeltaNet, DeltaNet, KDA; GVA heads):
    arguments and results as `linear_attention` above, with `v [T_r, Hv, V]`, `g [T_r, Hv(, K)]`,
    `beta [T_r, Hv]` and states `[S, Hv, K, V]`."""
    T, Hv, V = v.shape
    K = q.shape[-1]
    S = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    wide = torch.zeros(S, Hv, K, V + K, dtype=torch.float32, device=v.device)
    wide[..., V:] = torch.eye(K, device=v.device)                      # [0, I]: the final state is [B, M]
    ow, fin = ops.gated_delta_rule(q, k, torch.cat([v, v.new_zeros(T, Hv, K)], -1), g, beta, scale=scale,
                                   initial_state=wide, output_final_state=True, cu_seqlens=cu_seqlens,
                                   use_qk_l2norm=use_qk_l2norm, backend=backend)
    summary = (fin[..., V:].contiguous(), fin[..., :V].contiguous())  # M [S, Hv, K, K], B [S, Hv, K, V]
    S_in = _incoming(summary, True, initial_state, group, stats)
    out = ow[..., :V].contiguous()
    if S_in is not None:
        for i, a, b in _spans(cu_seqlens, T):                            # ow[..., V:] = scale M_t^T q_t
            _add(out, a, b, torch.einsum("lhm,hmv->lhv", ow[a:b, :, V:].float(), S_in[i]))
    return out, _finish(summary, S_in, True, output_final_state, None if initial_state is None
                        else initial_state.dtype)
