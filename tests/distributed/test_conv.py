"""Sequence-parallel causal conv1d on 2 and 4 gloo ranks equals the single-device op: each rank's parts
start from the W-1 inputs before them, gathered across several ranks when the parts before are
shorter than W-1; ragged batches, initial states, widths 1 to 5."""
import pytest
import torch

import portable_attn as pa
from portable_attn.conformance.tolerance import compare
from portable_attn.distributed import conv, split_packed

from .ranks import run_ranks

C = 12
BATCHES = {  # total tokens, cu_seqlens: one long sequence over tiny parts, and a ragged batch
    "tiny parts": (10, [0, 10]),
    "ragged": (45, [0, 3, 3, 20, 21, 45]),
}


def _check(rank, world):
    gen = torch.Generator().manual_seed(1)
    failures = []
    for (label, (T, bounds)), W, dtype in ((b, W, d) for b in BATCHES.items() for W in (1, 2, 4, 5)
                                           for d in (torch.float32, torch.bfloat16)):
        cu = torch.tensor(bounds, dtype=torch.int32)
        S = len(bounds) - 1
        x, weight, bias = (torch.randn(*s, generator=gen).to(dtype) for s in ((T, C), (C, W), (C,)))
        init = torch.randn(S, C, W - 1, generator=gen).to(dtype) if W % 2 else None
        part = split_packed(cu, T, world)[rank]
        kw = dict(activation="silu", output_final_state=True)
        y, fin = conv.causal_conv1d(x[part.start:part.stop], weight, bias, initial_state=init,
                                    cu_seqlens=part.cu_seqlens, **kw)
        upto = cu.clamp(max=part.stop)        # the single-device op up to the end of this rank's part
        one, one_fin = pa.causal_conv1d(x[:part.stop], weight, bias, initial_state=init, cu_seqlens=upto, **kw)
        ref, _ = pa.causal_conv1d(x[:part.stop].double(), weight.double(), bias.double(), cu_seqlens=upto,
                                  initial_state=None if init is None else init.double(), backend="reference", **kw)
        v = compare(y, ref[part.start:], one[part.start:], dtype)
        if not v.ok:
            failures.append(f"rank {rank}/{world} {label} W={W} {dtype}: err {v.err:.3g} > tol {v.tol:.3g} {v.detail}")
        if not torch.equal(fin, one_fin):     # the state is a copy of inputs: bit-exact
            failures.append(f"rank {rank}/{world} {label} W={W} {dtype}: final state differs")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_conv_equals_one_device(world):
    run_ranks(_check, world, timeout=120)
