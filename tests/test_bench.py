"""`portable-attn bench` end to end at the quick sizes: what it writes, and that peers that cannot run and
ops a backend does not support are reported, never fatal. No timing assertions: speed is measured by
the benchmark, not asserted in tests. The runs use the reference backend so they do not depend on the
state of the fast backends."""
import dataclasses
import json
import re
import sys

import pytest

import portable_attn
from portable_attn import NotSupported, cli
from portable_attn.bench import cases, peers, plan


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
            base = entries[case["baseline"]]
            assert base["status"] == "ok", base
            for e in entries.values():
                assert e["status"] == "ok", e
                assert len(e["times_s"]) == 2 and 0 < e["min_s"] <= e["median_s"]
                assert e["ratio"] == pytest.approx(base["median_s"] / e["median_s"])
                assert e["peak_mem_bytes"] is not None or e["peak_mem_note"]
                assert (e["gbps"] is not None) == (point["bytes"] is not None)
    series = [c["name"] for c in data["cases"] if len(c["points"]) > 1]
    assert series and sorted(p.stem for p in out.glob("*.png")) == sorted(series)


def test_missing_transformers_skips_its_peers(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers"] + ["transformers"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import transformers...` now fails
    rc, data = bench(tmp_path, "--case", "gdr", "ssd", "--no-memory")
    assert rc == 0
    for case, peer in (("gdr", "hf-qwen3next"), ("ssd", "hf-mamba2")):
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
