"""The GPU device check says clearly, on a machine without one, that it needs a GPU."""
import pathlib
import subprocess
import sys

import torch

from portable_attn.bench import cases

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_needs_a_gpu(tmp_path):
    assert not torch.cuda.is_available()
    res = subprocess.run(["bash", str(ROOT / "ci" / "gpu_check.sh")], capture_output=True, text=True,
                         env={"OUT": str(tmp_path), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 2
    assert "needs a CUDA GPU" in res.stderr and "nothing was run" in res.stderr


def test_gpu_check_benchmarks_every_gpu_case():
    script = (ROOT / "ci" / "gpu_check.sh").read_text()
    bench_lines = " ".join(line for line in script.splitlines() if line.strip().startswith("bench "))
    assert set(bench_lines.split()) >= set(cases.gpu_catalogue())
