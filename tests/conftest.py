"""Options for the whole test suite."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                     help="examples per op and backend for tests/test_fuzz.py (default: a small CI budget)")


@pytest.fixture
def fuzz_examples(request):
    return request.config.getoption("--fuzz-examples")
