"""Context-parallel attention through jax.shard_map on fake CPU meshes of 4 and 8 devices (sequence axis, and
sequence x heads), with the pallas backend in Pallas' TPU interpret mode, equals the single-device `attention`
within the conformance tolerance.

Each case runs in a child process of its own: XLA_FLAGS=--xla_force_host_platform_device_count must be set
before jax is imported, and the interpreter's simulated shared memory, once used by one mesh program, can
deadlock a second program in the same process (seen with jax 0.10.2 on this machine). The child has twice
as many host devices as its mesh: with only as many, 8-device meshes deadlocked intermittently inside Pallas'
interpret mode (docs/pitfalls.md)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("jax")
if os.environ.get("PORTABLE_ATTN_INTERPRET") != "1":
    pytest.skip("the pallas backend runs on the CPU in interpret mode only: start pytest with PORTABLE_ATTN_INTERPRET=1 "
                "JAX_PLATFORMS=cpu", allow_module_level=True)

LENS = [37, 1, 0, 50, 13]
CASES = [  # (mesh shape (seq, heads), lengths, options, dtype): each compiles its own programs (~10 s here)
    ((4, 1), LENS, dict(sinks=True), "float32"),
    ((2, 2), [70, 21], dict(window_size=(30, 0), sinks=True, softcap=10.0), "bfloat16"),
    ((8, 1), [90, 3, 41], dict(window_size=(20, 0)), "float32"),
]


def _torch(x):
    import jax.numpy as jnp

    return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(torch.float64)


def check(shape, lens, opts, dtype) -> dict:
    """In the child: the mesh result against the float64 reference, judged as the conformance suite does."""
    import jax
    from jax.sharding import Mesh

    import portable_attn as pa
    from portable_attn.backends.reference.precision import emulate
    from portable_attn.conformance.tolerance import compare
    from portable_attn.distributed import ContextLayout
    from portable_attn.distributed.jax_attention import context_attention, from_mesh, to_mesh

    mesh = Mesh(np.array(jax.devices()[:shape[0] * shape[1]]).reshape(shape), ("seq", "heads"))
    keys = jax.random.split(jax.random.key(sum(lens)), 4)
    t, hq, hkv, d = sum(lens), 4, 2, 16
    q, k, v = (jax.random.normal(kk, (t, h, d)).astype(dtype) for kk, h in zip(keys, (hq, hkv, hkv)))
    sinks = jax.random.normal(keys[3], (hq,)) if opts.get("sinks") else None
    window, softcap = tuple(opts.get("window_size", (-1, 0))), opts.get("softcap", 0.0)
    layout = ContextLayout(np.cumsum([0] + lens), shape[0])
    o, lse = context_attention(*(to_mesh(layout, x) for x in (q, k, v)), layout, mesh, head_axis="heads",
                               window_size=window, softcap=softcap, sinks=sinks, return_lse=True)
    got = {"o": from_mesh(layout, o), "lse": from_mesh(layout, lse, axis=1)}

    cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32)
    low = getattr(torch, dtype)
    args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, window_size=window, softcap=softcap, return_lse=True,
                backend="reference")
    qt, kt, vt = (_torch(x) for x in (q, k, v))
    st = None if sinks is None else _torch(sinks)
    oracle = dict(zip(("o", "lse"), pa.attention(qt, kt, vt, sinks=st, **args)))
    with emulate(low):
        emulated = dict(zip(("o", "lse"), pa.attention(qt.to(low), kt.to(low), vt.to(low),
                                                        sinks=None if st is None else st.float(), **args)))
    verdicts = {n: compare(_torch(got[n]), oracle[n], emulated[n], low) for n in got}
    return {n: [bool(v.ok), v.err, v.tol, v.detail] for n, v in verdicts.items()}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0][0]}x{c[0][1]}-{c[3]}" for c in CASES])
def test_shard_map_context_attention_equals_one_device(case):
    devices = 2 * CASES[case][0][0] * CASES[case][0][1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    child = subprocess.run([sys.executable, __file__, str(case)], env=env, capture_output=True, text=True,
                           timeout=240)
    assert child.returncode == 0, child.stderr[-3000:]
    for name, (ok, err, tol, detail) in json.loads(child.stdout.strip().splitlines()[-1]).items():
        assert ok, f"{CASES[case]} {name}: {detail or err} > {tol}"


if __name__ == "__main__":
    print(json.dumps(check(*CASES[int(sys.argv[1])])))
