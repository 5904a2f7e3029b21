"""The README's commands and example are what CI and users run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_the_two_commands_come_first_and_ci_runs_them():
    install, tests = blocks("bash")[:2]
    assert "portable-attn check" in install and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.strip() in ci and tests.strip() in ci


def test_python_example_runs():
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), {})
