"""The public attention ops trace under torch.compile(fullgraph=True) as portable_attn custom ops."""
import pytest
import torch

import portable_attn as pa


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, h, 16, generator=g) for h in (4, 2, 2))
    kc, vc = torch.randn(4, 3, 2, 16, generator=g), torch.randn(4, 3, 2, 16, generator=g)
    slots = torch.tensor([5, 0, -1, 7], dtype=torch.int32)
    table, used = torch.tensor([[2, 0, 1]], dtype=torch.int32), torch.tensor([8], dtype=torch.int32)

    def step(q, k, v, kc, vc):
        o, lse = pa.attention(q, k, v, causal=True, window_size=(5, 0), return_lse=True, backend=backend)
        pa.write_kv_cache(k[:4], v[:4], kc, vc, slots, backend=backend)
        d = pa.paged_attention(q[:1], kc, vc, table, used, backend=backend)
        return o, lse, d

    eager_caches = kc.clone(), vc.clone()
    want = step(q, k, v, *eager_caches)
    got = torch.compile(step, fullgraph=True, backend="eager")(q, k, v, kc, vc)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(kc, eager_caches[0])
    torch.testing.assert_close(vc, eager_caches[1])
