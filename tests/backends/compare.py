"""What the backend tests share: a backend's result beside the float64 reference on the same values."""
import torch

import portable_attn as pa

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def against_reference(backend: str, op: str, *args, **kw):
    """(the backend's (o, lse), the float64 reference's (o, lse)) of one attention-family call."""
    mine = getattr(pa, op)(*args, **kw, return_lse=True, backend=backend)
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kw64 = {n: (a.double() if n != "sinks" and isinstance(a, torch.Tensor) and a.is_floating_point() else a)
            for n, a in kw.items() if n != "out"}
    return mine, getattr(pa, op)(*up, **kw64, return_lse=True, backend="reference")


def assert_close(mine, ref, dtype=torch.float32):
    (o, lse), (ro, rlse) = mine, ref
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert lse.dtype == torch.float32 and o.dtype == dtype
    tol = ATOL[dtype] * max(1.0, float(ro.abs().max()))
    assert float((o.double() - ro).abs().max()) <= tol
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.equal(lse[~fin], rlse[~fin].float())
    if bool(fin.any()):
        assert float((lse.double() - rlse)[fin].abs().max()) <= 1e-4 * max(1.0, float(rlse[fin].abs().max()))


def paged_cache(g, lens, bs, hkv, d, dv, dtype=torch.float32, spare=3):
    """(k_cache, v_cache, block_table, seqused_k): a paged cache with a shuffled block table whose
    unused entries point at a spare block, for sequences of `lens` keys in blocks of `bs`."""
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks) + spare
    perm = torch.randperm(total, generator=g).to(torch.int32)
    table = torch.full((len(lens), max(nblocks + [1]) + 1), int(perm[-1]), dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblocks):
        table[i, :n] = perm[used:used + n]
        used += n
    kc, vc = (torch.randn(total, bs, hkv, e, generator=g).to(dtype) for e in (d, dv))
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32)


def state_tail(op: str, args: dict) -> tuple:
    """The per-sequence state shape of a recurrent sequence op called with `args`."""
    if op == "linear_attention":
        return tuple(args["q"].shape[1:]) + (args["v"].shape[2],)
    if op == "gated_delta_rule":
        return (args["v"].shape[1], args["q"].shape[2], args["v"].shape[2])
    if op == "ssd":
        return tuple(args["x"].shape[1:]) + (args["B"].shape[2],)
    return (args["x"].shape[1], args["weight"].shape[1] - 1)
