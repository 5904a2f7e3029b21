"""`portable-attn bench` end to end at the quick sizes: what it writes, and that peers that cannot run and
ops a backend does not support are reported, never fatal. No timing assertions: speed is measured by
the benchmark, not asserted in tests. The runs use the reference backend so they do not depend on the
state of the fast backends (the host case adds the cpu backend: its rows against the torch kernel are the point)."""
import dataclasses
import json
import os
import time
import re
import sys

import numpy as np
import pytest
import torch

import portable_attn
from portable_attn import NotSupported, cli, registry
from portable_attn.backends.cpu import native
from portable_attn.bench import cases, fla_peers, host, peers, plan
from portable_attn.bench.impls import Refused


def bench(out, *args):
    rc = cli.main(["bench", "--quick", "--backend", "reference", "--repeat", "2", "--out", str(out), *args])
    return rc, json.loads((out / "bench.json").read_text())


def impl(data, case, name, point=0):
    case = next(c for c in data["cases"] if c["name"] == case)
    return next(e for e in case["points"][point]["impls"] if e["name"] == name)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc, data = bench(out)
    return rc, out, data


def test_quick_run_writes_json_and_one_plot_per_series(quick_run):
    rc, out, data = quick_run
    assert rc == 0
    assert {"cpu", "cores", "torch", "date", "device"} <= set(data["machine"])
    catalogue = cases.catalogue(quick=True)
    assert [c["name"] for c in data["cases"]] == list(catalogue)
    for case in data["cases"]:
        assert len(case["points"]) == len(catalogue[case["name"]].points)
        for point in case["points"]:
            assert point["flops"] > 0
            entries = {e["name"]: e for e in point["impls"]}
            assert set(entries) == {"reference", *catalogue[case["name"]].peers}
            base = entries.get(case["baseline"])
            assert base is not None or case["baseline"] is None
            for e in entries.values():
                assert e["status"] == "ok", e
                assert len(e["times_s"]) == 2 and 0 < e["min_s"] <= e["median_s"]
                assert e["ratio"] == (pytest.approx(base["median_s"] / e["median_s"]) if base else None)
                assert e["peak_mem_bytes"] is not None or e["peak_mem_note"]
                assert (e["gbps"] is not None) == (point["bytes"] is not None)
                if e["gbps"] is not None:
                    assert e["bw_frac"] == pytest.approx(e["gbps"] / data["bandwidth"]["gbps"])
    series = [c["name"] for c in data["cases"] if len(c["points"]) > 1]
    assert series and sorted(p.stem for p in out.glob("*.png")) == sorted(series)
    bw = data["bandwidth"]
    assert bw["bytes"] == 2 * 16 * 2**20 and bw["gbps"] == pytest.approx(bw["bytes"] / bw["median_s"] / 1e9)
    md = (out / "bench.md").read_text()
    assert "Measured bandwidth: " in md and "| % BW |" in md and "no peer to compare with" in md


def test_a_cpu_run_measures_the_machine_and_each_thread_count(tmp_path):
    rc, data = bench(tmp_path, "--case", "gdr", "--no-memory", "--threads", "1", "2")
    assert rc == 0 and data["bandwidth"]["gbps"] > 0  # copy bandwidth even without a memory-bound case
    mm = data["machine"]["matmul"]
    assert set(mm["gflops"]) == {"fp32", "bf16"} and mm["size"] == {"fp32": 256, "bf16": 256}  # --quick: 256
    assert all(set(by) == {"1", "2"} and min(by.values()) > 0 for by in mm["gflops"].values())
    (case,) = data["cases"]
    assert [(p["x"], p["threads"]) for p in case["points"]] == [(2, 1), (2, 2)]
    one, two = ({e["name"]: e for e in p["impls"]} for p in case["points"])
    for name, e in two.items():
        assert one[name]["scaling"] == 1.0 and e["scaling"] == pytest.approx(one[name]["median_s"] / e["median_s"])
    md = (tmp_path / "bench.md").read_text()
    assert "| threads |" in md and "x of 1 thread" in md and "fp32 (256 x 256) " in md


def test_missing_transformers_skips_its_peers(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers"] + ["transformers"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import transformers...` now fails
    rc, data = bench(tmp_path, "--case", "gdr", "ssd", "gdr_step", "conv_step", "--no-memory")
    assert rc == 0
    for case, peer in (("gdr", "hf-qwen3next"), ("ssd", "hf-mamba2"), ("gdr_step", "hf-qwen3next-step"),
                       ("conv_step", "hf-conv-step")):
        e = impl(data, case, peer)
        assert e["status"] == "skipped" and "transformers" in e["reason"]
        ours = impl(data, case, "reference")
        assert ours["status"] == "ok" and ours["ratio"] is None  # the baseline did not run


def test_failing_peer_is_skipped_with_its_error(tmp_path, monkeypatch):
    def broken_compile(args, sizes):
        def call():
            raise RuntimeError("inductor failed (simulated)")
        return call
    monkeypatch.setitem(peers.PEERS, "flex", dataclasses.replace(peers.PEERS["flex"], prepare=broken_compile))
    rc, data = bench(tmp_path, "--case", "causal", "--no-memory")
    assert rc == 0
    e = impl(data, "causal", "flex")
    assert e["status"] == "skipped" and "inductor failed (simulated)" in e["reason"]
    assert impl(data, "causal", "sdpa-causal")["status"] == "ok"


def test_not_supported_is_reported_with_its_reason(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotSupported("reference", "ssd", "no SSD today (simulated)")
    monkeypatch.setattr(portable_attn, "ssd", refuse)
    rc, data = bench(tmp_path, "--case", "ssd", "--no-memory")
    assert rc == 0
    e = impl(data, "ssd", "reference")
    assert e["status"] == "unsupported" and e["reason"] == "no SSD today (simulated)" and "median_s" not in e
    assert impl(data, "ssd", "hf-mamba2")["ratio"] == 1.0


def test_dense_mask_peer_over_the_memory_budget_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(peers.PEERS, "flex", dataclasses.replace(peers.PEERS["flex"], prepare=peers._sdpa_causal))
    rc, data = bench(tmp_path, "--case", "swa", "--no-memory", "--mem-budget-gb", "0.0001")
    assert rc == 0
    for point in (0, 1):
        e = impl(data, "swa", "sdpa-mask", point)
        assert e["status"] == "skipped" and re.fullmatch(r"needs ≈[\d.]+ GB, over the 0.0001 GiB memory budget",
                                                         e["reason"]), e


def test_default_budget_skips_the_dense_mask_only_where_it_cannot_fit():
    need = peers.PEERS["sdpa-mask"].need_bytes
    budget = 16 * 2**30
    sizes = [p.sizes for p in cases.catalogue()["swa"].points]  # T = 4096, 16384, 65536
    assert [need(s) > budget for s in sizes] == [False, False, True]


def test_default_backends_leave_out_the_reference():
    names = plan.default_backends("cpu")
    assert "reference" not in names and all(portable_attn.registry.get(n).available() is None for n in names)


def test_list_prints_the_cases(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in cases.catalogue():
        assert name in out


@pytest.mark.parametrize("args", [["--case", "nope"], ["--backend", "nope"]])
def test_unknown_names_are_errors(args, capsys, tmp_path):
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), *args]) == 2
    assert "nope" in capsys.readouterr().out


STEP_BYTES = {"ssd_step": ("x", "x"), "gdr_step": ("v", "v"), "gla_step": ("v", "v"), "conv_step": ("x", "x")}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(STEP_BYTES))
def test_step_bytes_count_every_input_the_output_and_the_state_written_back(name, dtype):
    case = cases.catalogue(quick=True)[name]
    sizes = case.points[0].sizes | dict(dtype=dtype)
    args = case.make(sizes, "cpu")
    read = sum(t.nbytes for t in args.values() if isinstance(t, torch.Tensor))
    out = args[STEP_BYTES[name][1]].nbytes
    state_indices = 4 * sizes["B"]
    assert case.bytes(sizes) == read + out + args["state"].nbytes + state_indices


def test_gpu_cases_are_the_issue_sizes_with_known_peers():
    gpu = cases.gpu_catalogue()
    sizes = {n: c.points[0].sizes for n, c in gpu.items()}
    assert sizes["gpu_ssd"] == dict(T=8192, H=64, P=64, N=128, G=1, dtype="bf16")
    assert sizes["gpu_gdr"] == dict(T=8192, H=16, K=128, V=128, dtype="bf16")
    assert sizes["gpu_gdr_step"]["Hv"] == 32 and sizes["gpu_conv_step"] == dict(B=256, C=8192, W=4, dtype="bf16")
    for name, case in gpu.items():
        assert set(case.peers) <= set(peers.PEERS) and case.baseline in case.peers
        if name.endswith("_step"):
            assert case.graph and case.bytes and case.points[0].sizes["B"] == 256


def test_fla_peers_skip_off_cuda_with_a_reason():
    case = cases.catalogue(quick=True)["ssd"]
    args = case.make(case.points[0].sizes, "cpu")
    with pytest.raises(Refused, match="CUDA only") as info:
        peers.PEERS["fla-ssd"].prepare(args, case.points[0].sizes)
    assert info.value.status == "skipped"


# fla's kernels need a GPU; their argument mappings are checked here against the reference through a
# float64 stand-in written from fla's documented contract (layout [B, T, H, ...], state [N, HV, K, V] or
# [N, HV, V, K] with state_v_first, g as log-decay per head or per key dim, GVA by repeat_interleave).

def fake_fla(q, k, v, g=None, beta=None, *, gk=None, scale, initial_state=None, output_final_state=False,
             state_v_first=False, use_qk_l2norm_in_kernel=False):
    q, k, v = (t.double() for t in (q, k, v))
    if use_qk_l2norm_in_kernel:
        q, k = (t * torch.rsqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    q, k = (t.repeat_interleave(v.shape[2] // q.shape[2], dim=2) for t in (q, k))
    decay = (gk if gk is not None else g).double()
    decay = decay[..., None] if decay.dim() == 3 else decay  # [B, T, H, K or 1]
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state.double()
    S = S.transpose(-1, -2) if state_v_first else S
    o = []
    for t in range(T):
        S = decay[:, t, :, :, None].exp() * S
        u = v[:, t]
        if beta is not None:
            u = beta[:, t, :, None].double() * (u - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    final = S.transpose(-1, -2) if state_v_first else S
    return torch.stack(o, 1), final if output_final_state else None


def fake_conv_update(x, cache, weight, bias, activation):
    new = torch.cat([cache[..., 1:], x[..., None]], dim=-1)  # fla's cache: the W newest inputs
    y = (new * weight).sum(-1) + bias
    cache.copy_(new)
    return torch.nn.functional.silu(y) if activation == "silu" else y, cache


def _close(got, want):
    assert float((got.double() - want.double()).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("name, op, mapping", [("ssd", "ssd", fla_peers.ssd_as_simple_gla),
                                               ("gdr", "gated_delta_rule", fla_peers.gdr_call),
                                               ("gla", "linear_attention", fla_peers.gla_call)])
def test_fla_prefill_mappings_match_the_reference(name, op, mapping):
    case = cases.catalogue(quick=True)[name]
    args = case.make(case.points[0].sizes, "cpu")
    o, _ = mapping(args, fake_fla, False)()
    _close(o.squeeze(0), getattr(portable_attn, op)(**args, backend="reference")[0])


@pytest.mark.parametrize("name, op, mapping", [("ssd_step", "ssd_step", fla_peers.ssd_as_simple_gla),
                                               ("gdr_step", "gated_delta_rule_step", fla_peers.gdr_call),
                                               ("gla_step", "linear_attention_step", fla_peers.gla_call)])
def test_fla_step_mappings_match_the_reference(name, op, mapping):
    case = cases.catalogue(quick=True)[name]
    args = case.make(case.points[0].sizes, "cpu")
    o, final = mapping(args, fake_fla, True)()
    state = args["state"].clone()
    want = getattr(portable_attn, op)(**(args | dict(state=state)), backend="reference")
    _close(o.squeeze(1), want)
    _close(final, state)


def test_fla_conv_step_mapping_matches_the_reference():
    case = cases.catalogue(quick=True)["conv_step"]
    args = case.make(case.points[0].sizes, "cpu")
    y, cache = fla_peers.conv_step_call(args, fake_conv_update)()
    state = args["state"].clone()
    _close(y, portable_attn.causal_conv1d_step(**(args | dict(state=state)), backend="reference"))
    _close(cache[..., 1:], state)


def test_fla_step_mappings_refuse_a_state_cache_out_of_order():
    case = cases.catalogue(quick=True)["gdr_step"]
    args = case.make(case.points[0].sizes, "cpu")
    args["state_indices"] = torch.arange(len(args["q"]), dtype=torch.int32).flip(0)
    with pytest.raises(Refused, match="batch order"):
        fla_peers.gdr_call(args, fake_fla, True)


# The host case: each op at decode sizes beside the kernel it ends in, checks on and off.

HOST_KERNELS = {"attention": ["decode.cpp", "aten-flash", "sdpa"], "paged_attention": ["decode.cpp", "gather+flash"],
                "gated_delta_rule_step": ["recurrent.cpp"], "ssd_step": ["recurrent.cpp"], "causal_conv1d_step": ["conv.cpp"]}


def host_rows(op: str) -> dict:
    """{row name: (PORTABLE_ATTN_CHECK it runs with, the row its overhead is against)} of --backend cpu reference:
    the cpu backend against its compiled kernel, every other row against the backend's function."""
    kernels = HOST_KERNELS.get(op, [])
    rows = {k: (None, None) for k in kernels}
    for b in ("cpu", "reference"):
        raw = kernels[0] if b == "cpu" and kernels else f"{b} fn"
        rows |= {b: (True, raw), f"{b} check=0": (False, raw), f"{b} fn": (None, None if raw == f"{b} fn" else raw)}
    return rows


def test_host_case_rows_and_overheads(tmp_path):
    before = {(b, op): getattr(registry.get(b).impl(), op) for b in ("cpu", "reference") for op in cases.HOST_CALLS}
    decode = native.kernels() and native.kernels().decode
    rc = cli.main(["bench", "--quick", "--case", "host", "--backend", "cpu", "reference", "--repeat", "2",
                   "--no-memory", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 0 and [c["name"] for c in data["cases"]] == ["host"]
    case = data["cases"][0]
    assert case["kind"] == "host" and case["points"] == []
    points = cases.host_case(quick=True).points
    assert [c["op"] for c in case["calls"]] == [p.x for p in points] == list(cases.HOST_CALLS)
    for call, point in zip(case["calls"], points):
        assert call["sizes"] == point.sizes and call["flops"] > 0 and call["timer_s"] > 0
        rows, want = {e["name"]: e for e in call["impls"]}, host_rows(call["op"])
        assert list(rows) == list(want)
        for name, e in rows.items():
            assert e["status"] == "ok", e
            assert (e["checks"], e["vs"]) == want[name]
            assert len(e["times_s"]) == 2 and 0 < e["min_s"] <= e["median_s"]
            assert e["median_s"] == pytest.approx(float(np.median(e["times_s"])))
            assert e["calls_per_sample"] in (1, host.CALLS)
            if e["vs"] is None:
                assert e["overhead_s"] is None and e["in_call_s"] is None
            else:
                assert e["overhead_s"] == pytest.approx(e["median_s"] - rows[e["vs"]]["median_s"])
                # the time inside the `vs` function and the timer's own cost were counted
                assert 0 <= e["in_call_s"] + call["timer_s"] < e["median_s"]
                per_sample = e["in_call_times_s"]
                assert len(per_sample) == 2 and e["in_call_s"] == pytest.approx(np.median(per_sample))
    assert all(getattr(registry.get(b).impl(), op) is fn for (b, op), fn in before.items())  # the wrappers are gone
    assert native.kernels() is None or native.kernels().decode is decode
    md = (tmp_path / "bench.md").read_text()
    assert "**host**" in md and "| overhead µs | in-call µs |" in md and "| attention | decode.cpp |" in md


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("op", sorted(HOST_KERNELS))
def test_host_kernels_compute_the_op(op, quick):
    """Each kernel row computes the point's output and state update (so the overhead against it is of the same
    work); each call on its own copy of the point's tensors."""
    point = next(p for p in cases.host_case(quick).points if p.x == op)
    args = cases.HOST_CALLS[op][0](point.sizes, "cpu")

    def fresh():
        return {n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in args.items()}
    ref = fresh()
    want = getattr(portable_attn, op)(**ref, backend="reference")
    for impl in host.KERNELS[op]:
        mine = fresh()
        got = impl.prepare(mine, point.sizes)()
        o = got[0] if isinstance(got, tuple) else got  # the aten kernel returns (o, lse), decode.cpp (o, None)
        _close(o.reshape(want.shape), want)
        if "state" in args:
            _close(mine["state"], ref["state"])


@pytest.mark.parametrize("before", [None, "0", "1"])
def test_host_samples_run_under_their_check_setting(before, monkeypatch):
    if before is None:
        monkeypatch.delenv(host.CHECK_VAR, raising=False)
    else:
        monkeypatch.setenv(host.CHECK_VAR, before)
    seen = []

    def call():
        seen.append((os.environ.get(host.CHECK_VAR), portable_attn.checks.index_checks_enabled()))
    for checks, want in ((True, ("1", True)), (False, ("0", False)), (None, (before, before != "0"))):
        seen.clear()
        seconds = host._sampler(call, lambda: None, 3, checks, time.perf_counter)()
        assert seconds > 0 and seen == [want] * 3
        assert os.environ.get(host.CHECK_VAR) == before


def test_block_mask_flops_count_the_visible_pairs():
    case = cases.catalogue(quick=True)["block_mask"]
    sizes = case.points[0].sizes
    pos = torch.arange(sizes["T"])
    pairs = int(cases._local_global_mask(sizes).dense(0, 0, pos, pos).sum())
    assert case.flops(sizes) == 4.0 * sizes["H"] * sizes["D"] * pairs
    assert peers._mask_mod(case.make(sizes, "cpu"), sizes)(None, None, pos[:, None], pos[None, :]).sum() == pairs
