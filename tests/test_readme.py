"""The README's commands and example are what CI and users run."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang):
    """The code of every ```lang block (```python jax marks an example that needs jax)."""
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_the_two_commands_come_first_and_ci_runs_them():
    install, tests = blocks("bash")[:2]
    assert "portable-attn check" in install and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.strip() in ci and tests.strip() in ci


def run(code):
    exec(compile(code, "README.md", "exec"), {})


def test_python_examples_run():
    examples = blocks("python")
    assert len(examples) >= 4
    for code in examples:
        run(code)


def test_the_use_section_shows_every_op_family():
    use = README.split("## Use\n", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python(?: jax)?\n(.*?)```", use, re.S))
    for call in ("pa.attention(", "block_mask=", "pa.write_kv_cache(", "pa.paged_attention(", "pa.gated_delta_rule(",
                 "pa.gated_delta_rule_step(", "pa.ssd(", "pa.ssd_step(", "pa.causal_conv1d(", "pa.causal_conv1d_step(",
                 "pj.attention("):
        assert call in code, call


@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="the README's JAX example needs jax (pip install -e '.[pallas-interpret]')")
def test_jax_example_runs(monkeypatch):
    """Off-TPU the JAX front runs Pallas' interpret mode."""
    from jax.experimental.pallas import tpu as pltpu

    examples = blocks("python jax")
    assert examples
    monkeypatch.setenv("PORTABLE_ATTN_INTERPRET", "1")
    try:
        for code in examples:
            run(code)
    finally:
        pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="the README's ONNX export example needs pip install -e '.[onnx]'")
def test_onnx_example_runs():
    examples = blocks("python onnx")
    assert examples
    for code in examples:
        run(code)


def test_env_var_table_is_generated_from_envs():
    from portable_attn import envs

    table = re.search(r"<!-- env-vars:start -->\n(.*?)\n<!-- env-vars:end -->", README, re.S).group(1)
    assert table == envs.markdown(), "README's env-var table is stale: paste portable_attn.envs.markdown()"
