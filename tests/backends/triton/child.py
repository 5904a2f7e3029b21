"""Checks the triton tests run in a child process.

`assert_lowers`: lowering the kernels for real GPU targets without a GPU (and without the interpreter,
which accepts code the compilers reject): sm_90 with the float32 dot an NVIDIA GPU picks (tf32x3),
gfx942 with IEEE float32 dots. CI also runs these tests under the GPU image's Triton (3.6).
`assert_survives`: calls with bad index values and the checks off end normally (no memory fault)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

VENDORS = ("cuda", "hip")
INSTALL = "pip install -e '.[interpret]'"
SETTINGS = "TRITON_INTERPRET=1 PORTABLE_ATTN_INTERPRET=1"
_TARGET = {"cuda": 'GPUTarget("cuda", 90, 32)', "hip": 'GPUTarget("hip", "gfx942", 64)'}
_OPTIONS = {"cuda": {}, "hip": {"waves_per_eu": 2}}
_F32_DOT = {"cuda": "tf32x3", "hip": "ieee"}


def skip_unless_interpreting() -> None:
    """Skip the calling test module unless triton is installed and its interpreter was switched on at
    process start (Triton fixes its mode when a kernel is decorated, so a test cannot switch it on)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip(f"triton is not installed: {INSTALL}", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"needs {SETTINGS} in the environment at process start", allow_module_level=True)


# defined for `build`: the launchers pass None for an absent tensor, which Triton compiles as a constexpr
_ABSENT = """
    def absent(sig, ce, names):
        for n in names:
            sig[n], ce[n] = "constexpr", None
"""


def assert_lowers(vendor: str, build: str, options: dict, timeout: int = 900) -> None:
    """Run `build` (Python source defining `runs`, a list of (kernel, signature, constexprs), with
    `absent(sig, ce, names)` to pass None for the pointers `names`) in a child process and compile every
    run for the vendor's target with `options`."""
    code = "\n".join([
        "from triton.backends.compiler import GPUTarget",
        "from triton.compiler import ASTSource, compile",
        textwrap.dedent(_ABSENT),
        textwrap.dedent(build),
        "for fn, sig, ce in runs:",
        f"    compile(ASTSource(fn, sig, ce), target={_TARGET[vendor]}, options={dict(options, **_OPTIONS[vendor])!r})",
        "print('compiled', len(runs))",
    ])
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PORTABLE_ATTN_INTERPRET")}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PORTABLE_ATTN_TRITON_F32_DOT=_F32_DOT[vendor])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("this triton install has no GPU toolchain")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


def assert_survives(calls: str) -> None:
    """Run `calls` (Python source; bad index values) under the interpreter with PORTABLE_ATTN_CHECK=0 in a
    child process: it must end normally."""
    code = textwrap.dedent(calls) + "\nprint('survived')\n"
    env = dict(os.environ, PORTABLE_ATTN_CHECK="0", PORTABLE_ATTN_INTERPRET="1", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "survived" in res.stdout, res.stderr[-2000:]
