"""The conformance suite: a case catalogue checked against the float64 reference, with SPEC's invariants."""
from .cases import FULL, SMOKE, Case, catalogue
from .runner import Result, run_case
from .suite import available_backends, plan, run

__all__ = ["FULL", "SMOKE", "Case", "Result", "available_backends", "catalogue", "plan", "run", "run_case"]
