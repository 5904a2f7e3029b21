"""The pallas tests run Pallas' TPU interpret mode on the CPU (PORTABLE_ATTN_INTERPRET=1 is set for each
test); they are skipped where jax is not installed (pip install -e '.[pallas-interpret]')."""
import pytest

pytest.importorskip("jax", reason="jax not installed: pip install -e '.[pallas-interpret]', then run with "
                                  "PORTABLE_ATTN_INTERPRET=1 JAX_PLATFORMS=cpu")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    from jax.experimental.pallas import tpu as pltpu

    monkeypatch.setenv("PORTABLE_ATTN_INTERPRET", "1")
    yield
    pltpu.reset_tpu_interpret_mode_state()  # an exception inside interpret mode leaves state behind
