"""Sequence-parallel recurrent prefill through `jax.shard_map` on fake CPU meshes of 8 devices
(8 sequence shards) and 4 devices (2 heads x 2 sequence shards) equals the single-device op of the JAX
front (the pallas backend in Pallas' TPU interpret mode): outputs and final states, ragged batches with
sequences across many devices, initial states, strong and -inf decays. Judged by the conformance rule
against the float64 reference.

The meshes need `XLA_FLAGS=--xla_force_host_platform_device_count=16` before jax is imported, so this file
runs in a pytest invocation of its own (.ci/run):
    PORTABLE_ATTN_INTERPRET=1 JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=16 \\
        python -m pytest tests/distributed/test_jax_recurrent.py
Twice the devices the largest mesh uses: XLA's CPU client sizes its thread pool by the device count, and
with as many devices as the mesh, Pallas' interpret-mode callbacks and the mesh's collectives wait on
each other (a collective-permute rendezvous that only some device threads reach: a deadlock).
"""
import os

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="needs jax: pip install -e '.[pallas-interpret]'")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") or len(jax.devices()) < 16:
    pytest.skip("needs 16 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=16 set before jax is "
                "imported (a pytest invocation of its own, as .ci/run runs it)", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import portable_attn as pa  # noqa: E402
import portable_attn.jax as pj  # noqa: E402
from portable_attn import registry  # noqa: E402
from portable_attn.conformance.tolerance import compare  # noqa: E402
from portable_attn.distributed import jax_recurrent  # noqa: E402

if registry.get("pallas").available() is not None:
    pytest.skip(f"pallas unavailable: {registry.get('pallas').available()} (PORTABLE_ATTN_INTERPRET=1 "
                "JAX_PLATFORMS=cpu)", allow_module_level=True)

T, S = 64, 5
CU = [0, 5, 5, 30, 31, T]                       # an empty and a one-token sequence; 8 tokens per device at 8


def _mesh(seq, heads=None):
    devices = np.array(jax.devices()[:seq * (heads or 1)])
    if heads:
        return Mesh(devices.reshape(heads, seq), ("heads", "seq"))
    return Mesh(devices, ("seq",))


def _cases():
    rng = np.random.default_rng(0)

    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def decay(*shape):
        g = -rng.random(shape).astype(np.float32) * 0.3
        g[7], g[40] = -1e4, -np.inf
        return g

    H, K, V, P, N = 2, 16, 16, 8, 16
    return {
        "gla": ("linear_attention", dict(q=r(T, H, K), k=r(T, H, K), v=r(T, H, V), g=decay(T, H, K),
                                         initial_state=r(S, H, K, V))),
        "gated_deltanet": ("gated_delta_rule", dict(q=r(T, H, K), k=r(T, H, K), v=r(T, 4, V), g=decay(T, 4),
                                                    beta=rng.random((T, 4)).astype(np.float32), use_qk_l2norm=True,
                                                    initial_state=r(S, 4, K, V))),
        "mamba2": ("ssd", dict(x=r(T, 4, P), dt=r(T, 4), A=-rng.random(4).astype(np.float32) - 0.1, B=r(T, 2, N),
                               C=r(T, 2, N), D=rng.random(4).astype(np.float32), z=r(T, 4, P),
                               dt_bias=r(4, scale=0.1), dt_softplus=True, initial_state=r(S, 4, P, N))),
    }


def _reference(op, args):
    t = {n: (torch.from_numpy(a).double() if isinstance(a, np.ndarray) else a) for n, a in args.items()}
    return getattr(pa, op)(**t, cu_seqlens=torch.tensor(CU, dtype=torch.int32), output_final_state=True,
                           backend="reference")


@pytest.fixture(scope="module")
def single():
    """case -> (op, JAX arguments, the single-device op's (out, final), the float64 reference's)."""
    got = {}
    for name, (op, args) in _cases().items():
        j = {n: (jnp.asarray(a) if isinstance(a, np.ndarray) else a) for n, a in args.items()}
        one = getattr(pj, op)(**j, cu_seqlens=jnp.asarray(CU, jnp.int32), output_final_state=True)
        got[name] = op, j, one, _reference(op, args)
    return got


@pytest.mark.parametrize("seq, heads", [(8, None), (2, 2)])
def test_sequence_parallel_on_a_mesh_equals_one_device(single, seq, heads):
    """8 devices on the sequence (a shift and three scan rounds), and 2 heads x 2 sequence shards."""
    mesh = _mesh(seq, heads)
    failures = []
    for name, (op, j, (one, one_fin), (ref, ref_fin)) in single.items():
        out, fin = getattr(jax_recurrent, op)(mesh, **j, cu_seqlens=CU, head_axis="heads" if heads else None)
        for what, got, oracle, emulated in (("out", out, ref, one), ("final state", fin, ref_fin, one_fin)):
            v = compare(torch.from_numpy(np.array(got)), oracle, torch.from_numpy(np.array(emulated)),
                        torch.float32)
            if not v.ok:
                failures.append(f"{name} on {seq} x {heads or 1} devices, {what}: err {v.err:.3g} > tol {v.tol:.3g} "
                                f"{v.detail}")
    assert not failures, "\n".join(failures)


def test_uneven_tokens_are_refused():
    with pytest.raises(ValueError, match="do not split evenly"):
        x = jnp.ones((10, 2, 16))
        jax_recurrent.linear_attention(_mesh(4), x, x, x)
