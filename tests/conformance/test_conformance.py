"""The conformance suite through pytest: every available backend, every smoke case, every dtype.

An unsupported case is reported as skipped with its reason, never as passed.
"""
import pytest

from portable_attn.conformance import SMOKE, catalogue, run_case
from portable_attn.conformance.suite import DEFAULT_DTYPES, available_backends

JOBS = [(b, c, d) for b in available_backends() for c in catalogue(SMOKE) for d in DEFAULT_DTYPES]


@pytest.mark.conformance
@pytest.mark.parametrize("backend,case,dtype", JOBS, ids=[f"{b}-{c.op}-{c.name}-{d}" for b, c, d in JOBS])
def test_case(backend, case, dtype):
    res = run_case(backend, case, dtype)
    if res.status == "unsupported":
        pytest.skip(f"unsupported: {res.detail}")
    assert res.status == "pass", f"{res.status}: {res.detail} (err {res.err}, tol {res.tol})"
