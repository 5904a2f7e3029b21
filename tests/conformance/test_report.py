"""The support matrix says what passed, what a backend refused and why, and how an op is implemented."""
from portable_attn.conformance.report import markdown
from portable_attn.conformance.runner import Result


def _r(backend, op, case, dtype, status, detail=""):
    return Result(backend, op, case, dtype, status, detail=detail)


def test_matrix_cells_show_refusals_beside_passes_and_notes():
    results = [_r("b", "attention", "plain", "float32", "pass"),
               _r("b", "attention", "tiny_blocks", "float32", "unsupported", "blocks 1x1"),
               _r("b", "ssd", "plain", "float32", "unsupported", "no ssd"),
               _r("b", "causal_conv1d", "plain", "float32", "pass"),
               _r("b", "linear_attention", "plain", "float32", "fail", "err")]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in markdown(results, {("b", "causal_conv1d"): "jitted JAX"}).splitlines()[2:]}
    assert rows["`attention`"] == "yes (float32); not: blocks 1x1"
    assert rows["`ssd`"] == "no: no ssd"
    assert rows["`causal_conv1d`"] == "yes (float32) [jitted JAX]"
    assert rows["`linear_attention`"] == "fails: float32"
