"""The suite must be able to fail: backends with planted bugs are caught, each by the right check."""
import pytest
import torch

from portable_attn import registry
from portable_attn.backend import Backend
from portable_attn.conformance import SMOKE, catalogue, run_case
from portable_attn.errors import NotSupported
from portable_attn.backends.reference import BACKEND as REFERENCE


class Mutant(Backend):
    """The reference with one planted bug, applied to the call's arguments or to its result."""

    platforms = REFERENCE.platforms

    def __init__(self, name, before=None, after=None, ops=None):
        self.name, self.before, self.after = name, before, after
        self.ops = ops or REFERENCE.ops

    def run(self, call):
        args = dict(call.args)
        if self.before:
            args = self.before(call.op, args)
        result = REFERENCE.run(type(call)(call.op, args, call.platform))
        return self.after(call.op, args, result) if self.after else result


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _noisy(op, args, result):
    o = _first(result)
    if o is not None and o.numel():
        o.add_(1e-2 * o.abs().max().clamp(min=1) * torch.randn_like(o))
    return result


def _unwritten(op, args, result):
    o = _first(result)
    if o is not None and o.numel():
        o[-1].fill_(float("nan"))
    return result


def _strided_new_output(op, args, result):
    """A new output (no out= given) returned as a transposed copy: right values, not contiguous."""
    o = _first(result)
    if args.get("out") is None and o is not None and o.dim() > 1:
        o = o.transpose(-1, -2).contiguous().transpose(-1, -2)
        return (o, *result[1:]) if isinstance(result, tuple) else o
    return result


def _touch_other_rows(op, args, result):
    cache = args.get("state") if op.endswith("_step") else args.get("initial_state")
    idx = args.get("state_indices")
    if cache is not None and idx is not None:
        free = sorted(set(range(cache.shape[0])) - {int(i) for i in idx.tolist()})
        if free:
            cache[free[0]] += 1.0
    return result


def _drop_window(op, args):
    if "window_size" in args:
        args["window_size"] = (-1, -1)
    return args


def _drop_sinks(op, args):
    args["sinks"] = None if "sinks" in args else args.get("sinks")
    return args


def _wrong_gqa(op, args):
    """Query head h reads kv head h % Hkv instead of h // (Hq // Hkv)."""
    if op == "attention" and args["q"].shape[1] != args["k"].shape[1]:
        hq, hkv = args["q"].shape[1], args["k"].shape[1]
        perm = torch.tensor([(h % hkv) * (hq // hkv) + h // hkv for h in range(hq)])
        args["q"] = args["q"][:, perm]
        if args.get("sinks") is not None:
            args["sinks"] = args["sinks"][perm]
    return args


class _Flaky:
    """Different bits on every call (like an atomic-add reduction)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, op, args, result):
        self.calls += 1
        o = _first(result)
        if o is not None and o.numel() and o.is_floating_point():
            o.view(-1)[0] = torch.nextafter(o.view(-1)[0], torch.tensor(float("inf"), dtype=o.dtype)) \
                if self.calls % 2 else o.view(-1)[0]
        return result


def _unsupported_bf16(op, args):
    first = next(v for v in args.values() if isinstance(v, torch.Tensor))
    if first.dtype == torch.bfloat16:
        raise NotSupported("mutant", op, "bfloat16 is not handled")
    return args


@pytest.fixture
def with_backend(monkeypatch):
    def install(backend):
        known = dict(registry.backends()) | {backend.name: backend}
        monkeypatch.setattr(registry, "backends", lambda: known)
        return backend.name
    return install


def _results(name, ops=None, dtypes=("float32",)):
    return [run_case(name, c, d) for c in catalogue(SMOKE, ops) for d in dtypes]


def test_reference_itself_passes(with_backend):
    name = with_backend(Mutant("honest"))
    results = _results(name, ["attention", "ssd_step"])
    assert results and all(r.status == "pass" for r in results), [r for r in results if r.status != "pass"]


@pytest.mark.parametrize("mutant,ops,expect", [
    (Mutant("noisy", after=_noisy), None, "err"),
    (Mutant("unwritten", after=_unwritten), None, "NaN"),
    (Mutant("rows", after=_touch_other_rows), ["linear_attention_step", "ssd"], "rows not listed"),
    (Mutant("window", before=_drop_window), ["attention"], ""),
    (Mutant("sinks", before=_drop_sinks), ["attention", "paged_attention", "sparse_attention",
                                                     "merge_attention_states"], ""),
    (Mutant("gqa", before=_wrong_gqa), ["attention"], ""),
    (Mutant("strided_new_output", after=_strided_new_output), ["attention", "ssd"], "must be contiguous"),
])
def test_planted_bug_is_caught(with_backend, mutant, ops, expect):
    name = with_backend(mutant)
    results = _results(name, ops)
    failed = [r for r in results if r.status == "fail"]
    assert failed, f"no case caught the {name} mutant"
    assert any(expect in r.detail for r in failed), [r.detail for r in failed]


def test_nondeterminism_is_caught(with_backend):
    name = with_backend(Mutant("flaky", after=_Flaky()))
    results = _results(name, ["attention"])
    assert any("not deterministic" in r.detail for r in results)


def test_unsupported_is_never_a_pass(with_backend):
    name = with_backend(Mutant("partial", before=_unsupported_bf16))
    results = _results(name, ["causal_conv1d"], dtypes=("float32", "bfloat16"))
    assert {r.status for r in results if r.dtype == "bfloat16"} == {"unsupported"}
    assert all("bfloat16 is not handled" in r.detail for r in results if r.dtype == "bfloat16")
    assert {r.status for r in results if r.dtype == "float32"} == {"pass"}


def test_an_op_a_backend_lacks_is_unsupported(with_backend):
    name = with_backend(Mutant("attn-only", ops=("attention",)))
    results = _results(name, ["ssd"])
    assert results and {r.status for r in results} == {"unsupported"}
    assert "ssd is not implemented" in results[0].detail


def _ignore_strides(op, args):
    """Reads (and writes) every float tensor as if it were contiguous from its first element."""
    return {n: torch.as_strided(v, v.shape, torch.empty(v.shape).stride(), v.storage_offset())
            if isinstance(v, torch.Tensor) and v.is_floating_point() else v for n, v in args.items()}


def _write_before_view(op, args, result):
    """Clobbers the element just before each in-place tensor's view (as a kernel with an off-by-one)."""
    for name in ("out", "k_cache", "state", "initial_state"):
        t = args.get(name)
        if isinstance(t, torch.Tensor) and t.storage_offset() > 0:
            torch.as_strided(t, (1,), (1,), t.storage_offset() - 1).zero_()
    return result


def _multiply_all_memory(op, args, result):
    """Multiplies every key, value, cache row and merged part by zero into the output: 0 * NaN is NaN."""
    o = _first(result)
    mem = [args[n] for n in ("k", "v", "k_cache", "v_cache", "state", "initial_state", "o_a", "o_b")
           if isinstance(args.get(n), torch.Tensor) and args[n].numel()]
    if o is not None and o.numel() and mem:
        o.add_(0 * sum(m.double().sum() for m in mem).to(o.dtype))
    return result


def _cases(suffix):
    return [c for c in catalogue(SMOKE) if suffix in c.name]


@pytest.mark.parametrize("mutant,suffix,expect", [
    (Mutant("strides", before=_ignore_strides), "+gaps", ""),
    (Mutant("outside", after=_write_before_view), "+gaps", "wrote outside the view"),
    (Mutant("masked_multiply", after=_multiply_all_memory), "+poison", "NaN"),
])
def test_strided_and_poison_cases_catch_every_op(with_backend, mutant, suffix, expect):
    name = with_backend(mutant)
    cases = _cases(suffix)
    ops = {c.op for c in cases}
    caught = {c.op for c in cases if expect in (r := run_case(name, c, "float32")).detail and r.status == "fail"}
    assert ops - caught == set(), f"the {name} mutant passed on {ops - caught}"
    if suffix == "+gaps":
        assert len(ops) == 13


def test_poison_cases_poison_something():
    """A poison case whose inputs hold no invisible memory could not fail."""
    from portable_attn.conformance import invisible, tensors
    from portable_attn.conformance.runner import seed_of
    import numpy as np

    for case in [c for c in catalogue("full") if c.poison]:
        inputs = tensors.to_torch(case.make(np.random.default_rng(seed_of(case))), torch.float32, "cpu")
        masks = invisible.invisible(case.op, inputs)
        assert masks and any(bool(m.any()) for m in masks.values()), case.name


def _heads_major_misread(op, args):
    """Reads paged caches as if stored [NB, BS, Hkv, D] whatever their strides (a kernel assuming SPEC's layout)."""
    return _ignore_strides(op, args) if "k_cache" in args else args


def _scale_bug_without_lse(op, args):
    """Halves the softmax scale on the path without lse (as a second kernel with its own bug)."""
    if op in ("attention", "paged_attention") and not args["return_lse"]:
        args["softmax_scale"] = 0.5 * (args["softmax_scale"] or args["q"].shape[-1] ** -0.5)
    return args


@pytest.mark.parametrize("mutant,keep,ops", [
    (Mutant("heads_major", before=_heads_major_misread), lambda c: c.heads_major,
     {"paged_attention", "write_kv_cache"}),
    (Mutant("no_lse_route", before=_scale_bug_without_lse), lambda c: "+no_lse" in c.name,
     {"attention", "paged_attention"}),
])
def test_route_cases_catch_their_layout_and_path(with_backend, mutant, keep, ops):
    """The cases for kernels without lse (SDPA on a GPU, IPEX) and for heads-major caches (IPEX) run those paths."""
    name = with_backend(mutant)
    cases = [c for c in catalogue(SMOKE) if keep(c)]
    caught = {c.op for c in cases if run_case(name, c, "float32").status == "fail"}
    assert caught == ops
