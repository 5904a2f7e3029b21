"""ci/tune_triton.py (the launch-table sweep run on a GPU) runs its variants and puts the table back, here
under Triton's interpreter on a bench case's tiny sizes. Skipped unless TRITON_INTERPRET=1 at process start."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from tests.backends.triton.child import skip_unless_interpreting

skip_unless_interpreting()

from portable_attn.backends.triton import tuning  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve().parents[3] / "ci" / "tune_triton.py"


def load():
    spec = importlib.util.spec_from_file_location("tune_triton", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_times_each_variant_and_restores_the_table(tmp_path, capsys):
    before = tuning.RECURRENT["interpret"]
    out = tmp_path / "sweep.json"
    rc = load().main(["--case", "conv_step", "--quick", "--device", "cpu", "--repeat", "1",
                      "--vary", "step_block_c=8,16,32", "--json", str(out)])
    assert rc == 0
    assert tuning.RECURRENT["interpret"] is before
    rows = json.loads(out.read_text())["rows"]
    assert [r["entry"]["step_block_c"] for r in rows] == [before.step_block_c, 8, 32]
    assert all(r["median_s"] > 0 for r in rows)
    assert "{'step_block_c': 32}" in capsys.readouterr().out


def test_unknown_field_is_refused():
    with pytest.raises(SystemExit, match="no field 'block_x'"):
        load().variants(tuning.RECURRENT["interpret"], ["block_x=1"])
