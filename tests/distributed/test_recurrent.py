"""Sequence-parallel recurrent prefill on 2 and 4 gloo ranks equals the single-device op: outputs and the
states at the end of every rank's part, ragged packed batches (sequences split across ranks, empty and
one-token ones), initial states, strong and -inf decays, grouped heads; float32 and bfloat16.

Judged by the conformance rule: the error against the float64 reference may be 3x the single-device
op's own error plus the dtype's floor."""
import pathlib
import re

import pytest
import torch

import portable_attn as pa
from portable_attn.conformance.tolerance import compare
from portable_attn.distributed import recurrent, split_packed

from .ranks import run_ranks

T, S = 90, 5
CU = torch.tensor([0, 5, 5, 40, 41, T], dtype=torch.int32)   # an empty and a one-token sequence


def _inputs(dtype):
    """Global arguments (same seed on every rank): case -> (op, the arguments over tokens, all arguments)."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def decay(*shape):
        g = -torch.rand(*shape, generator=gen) * 0.3
        g[7], g[50] = -1e4, -float("inf")                          # a strong decay and a reset
        return g

    H, K, V, Hv, P, N, G = 2, 16, 16, 4, 8, 16, 2
    q, k = r(T, H, K), r(T, H, K)
    la = ("q", "k", "v", "g")
    gdr = ("q", "k", "v", "g", "beta")
    cases = {
        "linear_attention": ("linear_attention", la, dict(q=q, k=k, v=r(T, H, V), scale=0.5, g=None,
                                                          initial_state=r(S, H, K, V).float())),
        "simple_gla": ("linear_attention", la, dict(q=q, k=k, v=r(T, H, V), g=decay(T, H),
                                                    initial_state=r(S, H, K, V).float())),
        "gla": ("linear_attention", la, dict(q=q, k=k, v=r(T, H, V), g=decay(T, H, K), initial_state=None)),
        "gated_deltanet_gva": ("gated_delta_rule", gdr,
                               dict(q=q, k=k, v=r(T, Hv, V), g=decay(T, Hv), beta=torch.rand(T, Hv, generator=gen),
                                    use_qk_l2norm=True, initial_state=r(S, Hv, K, V).float())),
        "kda": ("gated_delta_rule", gdr,
                dict(q=r(T, H, K, scale=0.25), k=r(T, H, K, scale=0.25), v=r(T, H, V), g=decay(T, H, K),
                     beta=torch.rand(T, H, generator=gen), initial_state=r(S, H, K, V).to(dtype))),
        "mamba2": ("ssd", ("x", "dt", "B", "C", "z"),
                   dict(x=r(T, 4, P), dt=torch.randn(T, 4, generator=gen), A=-torch.rand(4, generator=gen) - 0.1,
                        B=r(T, G, N), C=r(T, G, N), D=torch.rand(4, generator=gen), z=r(T, 4, P),
                        dt_bias=torch.randn(4, generator=gen) * 0.1, dt_softplus=True, dt_limit=(0.0, 2.0),
                        initial_state=r(S, 4, P, N).float())),
    }
    return cases


def _single(op, args, cu, backend, dtype):
    fn = getattr(pa, op)
    a = {n: (t.double() if torch.is_tensor(t) and dtype == torch.float64 and t.is_floating_point() else t)
         for n, t in args.items()}
    return fn(**a, cu_seqlens=cu, output_final_state=True, backend=backend)


def _check(rank, world, backend):
    part = split_packed(CU, T, world)[rank]
    failures = []
    for dtype, (name, (op, token_args, args)) in ((d, c) for d in (torch.float32, torch.bfloat16)
                                                  for c in _inputs(d).items()):
        mine = {n: (t[part.start:part.stop] if n in token_args and t is not None else t) for n, t in args.items()}
        stats = {}
        out, fin = getattr(recurrent, op)(**mine, cu_seqlens=part.cu_seqlens, output_final_state=True,
                                                 backend=backend, stats=stats)
        # the single-device op and the float64 reference over the tokens up to the end of this rank's part:
        # their outputs on this part, their final states = the states at this part's end
        upto = {n: (t[:part.stop] if n in token_args and t is not None else t) for n, t in args.items()}
        cu_upto = CU.clamp(max=part.stop)
        one, one_fin = _single(op, upto, cu_upto, backend, dtype)
        ref, ref_fin = _single(op, upto, cu_upto, "reference", torch.float64)
        for what, got, oracle, emulated in (("out", out, ref[part.start:], one[part.start:]),
                                            ("final state", fin, ref_fin, one_fin)):
            v = compare(got, oracle, emulated, dtype)
            if not v.ok:
                failures.append(f"rank {rank}/{world} {name} {dtype} {what}: err {v.err:.3g} > tol {v.tol:.3g} "
                                f"{v.detail}")
        state = args["initial_state"] if args["initial_state"] is not None else fin
        if rank < world - 1 and stats["bytes_sent"] > 4 * 3 * state.numel() * state.element_size():
            failures.append(f"{name}: rank {rank} sent {stats['bytes_sent']} bytes, not O(state)")
    assert not failures, "\n".join(failures)
    _readme_example(rank, world)


README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()


def _readme_example(rank, world):
    """The README's sequence-parallel example, run on this rank, equals the single-device op."""
    ns = {}
    exec(compile(re.search(r"```python torchrun\n(.*?)```", README, re.S).group(1), "README.md", "exec"), ns)
    one, fin = pa.gated_delta_rule(*(ns[n] for n in ("q", "k", "v", "g", "beta")), cu_seqlens=ns["cu_seqlens"],
                                   initial_state=ns["h0"], use_qk_l2norm=True, output_final_state=True)
    torch.testing.assert_close(ns["o"], one[ns["mine"]], rtol=1e-4, atol=1e-4)
    if rank == world - 1:
        torch.testing.assert_close(ns["state"], fin, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_recurrent_equals_one_device(world):
    run_ranks(_check, world, "cpu", timeout=240)


def test_bench_counts_state_sized_messages():
    """The bench's 2-rank run: each rank sends one summary (M and B), whatever the number of tokens."""
    from portable_attn.bench import distributed_recurrent as bench

    rows = bench.run(worlds=(2,), tokens=64, dtypes=("float32",), reps=1)
    sent = {r["op"]: r["bytes_sent"] for r in rows}
    H, K, V, P, N = bench.H, bench.K, bench.V, bench.P, bench.N
    assert sent == {"gla": 4 * H * K * (1 + V), "gated_delta_rule": 4 * H * K * (K + V), "ssd": 4 * H * (1 + P * N)}
    assert "bytes sent/rank" in bench.table(rows)
