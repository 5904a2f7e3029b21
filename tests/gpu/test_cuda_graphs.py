"""On a CUDA GPU: a hybrid model's decode step through the triton backend captures into a CUDA graph and
under torch.compile(fullgraph=True), and each replay with new inputs matches the eager step, caches updated
in place (the checks skip their index-value syncs while a stream captures). ci/gpu_check.sh runs these."""
import pytest
import torch

import portable_attn as pa

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (ci/gpu_check.sh runs these on one)", allow_module_level=True)

B, HQ, HKV, D, BLOCK, BLOCKS, T = 4, 8, 2, 64, 16, 32, 6  # decode batch, heads, paged cache, prefill chunk


def _inputs(seed: int) -> dict:
    """One step's tensors (random, on the GPU) and the caches it updates; sequences use shuffled blocks."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    bf = lambda *s: r(*s).bfloat16()  # noqa: E731
    table = torch.randperm(BLOCKS, device="cuda", generator=g).view(B, -1).int()
    used = torch.tensor([37, 5, 64, 1], dtype=torch.int32, device="cuda")
    return dict(
        q=bf(B, HQ, D), k=bf(B, HKV, D), v=bf(B, HKV, D), kc=bf(BLOCKS, BLOCK, HKV, D), vc=bf(BLOCKS, BLOCK, HKV, D),
        slots=(table[:, 0].long() * BLOCK + (used.long() - 1) % BLOCK).int(), table=table, used=used,
        pq=bf(T, HQ, D), pk=bf(T, HKV, D), pv=bf(T, HKV, D),
        gq=bf(B, 2, 32), gk=bf(B, 2, 32) * 0.3, gv=bf(B, 4, 32), gg=-r(B, 4).abs(), beta=torch.rand(B, 4, generator=g,
                                                                                                   device="cuda"),
        gdr=r(B + 2, 4, 32, 32), rows=torch.tensor([5, 0, -1, 2], dtype=torch.int32, device="cuda"),
        x=bf(B, 4, 16), dt=r(B, 4), A=-r(4).exp(), Bm=bf(B, 2, 32), Cm=bf(B, 2, 32), ssd=r(B + 2, 4, 16, 32),
        xc=bf(B, 256), w=bf(256, 4) * 0.5, bias=bf(256), conv=bf(B + 2, 256, 3),
        la=r(B + 2, 2, 32, 32), lg=-r(B, 2).abs())


CACHES = ("kc", "vc", "gdr", "ssd", "conv", "la")


def _step(t: dict) -> tuple:
    """A decode step of every kind of layer: write K/V, paged decode, a causal prefill chunk and each step form."""
    pa.write_kv_cache(t["k"], t["v"], t["kc"], t["vc"], t["slots"], backend="triton")
    o = pa.paged_attention(t["q"], t["kc"], t["vc"], t["table"], t["used"], backend="triton")
    p, lse = pa.attention(t["pq"], t["pk"], t["pv"], causal=True, window_size=(3, 0), return_lse=True,
                          backend="triton")
    a = pa.gated_delta_rule_step(t["gq"], t["gk"], t["gv"], t["gg"], t["beta"], state=t["gdr"],
                                 state_indices=t["rows"], use_qk_l2norm=True, backend="triton")
    s = pa.ssd_step(t["x"], t["dt"], t["A"], t["Bm"], t["Cm"], state=t["ssd"], state_indices=t["rows"],
                    dt_softplus=True, backend="triton")
    c = pa.causal_conv1d_step(t["xc"], t["w"], t["bias"], state=t["conv"], state_indices=t["rows"],
                              activation="silu", backend="triton")
    la = pa.linear_attention_step(t["gq"], t["gk"], t["gq"], state=t["la"], g=t["lg"], state_indices=t["rows"],
                                  backend="triton")
    return o, p, lse, a, s, c, la


def _assert_same(got: tuple, want: tuple, t: dict, eager: dict) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"output {i}")
    for name in CACHES:
        torch.testing.assert_close(t[name], eager[name], atol=0, rtol=0, msg=f"cache {name}")


def _refill(static: dict, seed: int) -> dict:
    """New values copied into the captured tensors (their addresses stay); returns an eager copy of them."""
    for name, x in _inputs(seed).items():
        static[name].copy_(x)
    return {n: x.clone() for n, x in static.items()}


def test_cuda_graph_replay_matches_eager():
    static = _inputs(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream (compiles and autotunes the kernels)
        _step({n: x.clone() for n, x in static.items()})
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _step(static)
    for seed in (1, 2):
        eager = _refill(static, seed)
        want = _step(eager)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(outs, want, static, eager)


def test_compiled_fullgraph_then_captured_matches_eager():
    """torch.compile(fullgraph=True) with inductor keeps the ops as custom ops (one graph, no break) and the
    compiled step captures into a CUDA graph as vLLM does with its compiled pieces."""
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True)
    static = _inputs(3)
    eager = {n: x.clone() for n, x in static.items()}
    _assert_same(compiled(static), _step(eager), static, eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = compiled(static)
    eager = _refill(static, 4)
    want = _step(eager)
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(outs, want, static, eager)
