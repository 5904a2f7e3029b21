"""The GPU device check says clearly, on a machine without one, that it needs a GPU."""
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_needs_a_gpu(tmp_path):
    assert not torch.cuda.is_available()
    res = subprocess.run(["bash", str(ROOT / "ci" / "gpu_check.sh")], capture_output=True, text=True,
                         env={"OUT": str(tmp_path), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 2
    assert "needs a CUDA GPU" in res.stderr and "nothing was run" in res.stderr
