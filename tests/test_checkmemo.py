"""The check memo (portable_attn/checkmemo.py) changes nothing but the cost: a call whose signature passed
before gets the arguments and the errors the full checks give it."""
import pytest
import torch

import portable_attn as pa
from portable_attn import checkmemo, registry
from portable_attn.errors import NotSupported
from portable_attn.ops import make_call

I32 = torch.int32
GUARDS = checkmemo.TensorGuards
fast_path = pytest.mark.skipif(GUARDS is None, reason="this torch has no dynamo guards: no call skips its signature")


def paged_args():
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(8, 4, 2, 16, generator=g), torch.randn(8, 4, 2, 16, generator=g)
    return dict(q=torch.randn(3, 4, 16, generator=g), k_cache=kc, v_cache=vc,
                block_table=torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]], dtype=I32),
                seqused_k=torch.tensor([9, 12, 5], dtype=I32), max_seqlen_k=12)


def step_args(**extra):
    g = torch.Generator().manual_seed(2)
    return dict(q=torch.randn(3, 2, 8, generator=g), k=torch.randn(3, 2, 8, generator=g),
                v=torch.randn(3, 4, 8, generator=g), g=-torch.rand(3, 4, generator=g),
                beta=torch.rand(3, 4, generator=g), state=torch.randn(5, 4, 8, 8, generator=g), **extra)


def attn_args(**extra):
    g = torch.Generator().manual_seed(3)
    return dict(q=torch.randn(6, 4, 16, generator=g), k=torch.randn(6, 2, 16, generator=g),
                v=torch.randn(6, 2, 16, generator=g), **extra)


def write_args():
    g = torch.Generator().manual_seed(4)
    return dict(k=torch.randn(3, 2, 16, generator=g), v=torch.randn(3, 2, 16, generator=g),
                k_cache=torch.zeros(4, 4, 2, 16), v_cache=torch.zeros(4, 4, 2, 16),
                slot_mapping=torch.tensor([5, -1, 9], dtype=torch.int64))


def sparse_args():
    return attn_args(indices=torch.tensor([[[0, 1], [2, -1]]] * 6, dtype=I32))


# (op, arguments): valid calls, one per kind of normalisation or index argument the memo replays
VALID = {
    "write": ("write_kv_cache", write_args),
    "sparse": ("sparse_attention", sparse_args),
    "attention": ("attention", lambda: attn_args(causal=True, window_size=[2, 0], softcap=1,
                                                 out=torch.empty(6, 4, 16))),
    "attention varlen": ("attention", lambda: attn_args(cu_seqlens_q=torch.tensor([0, 2, 6], dtype=I32),
                                                        cu_seqlens_k=torch.tensor([0, 2, 6], dtype=I32))),
    "paged": ("paged_attention", paged_args),
    "step default rows": ("gated_delta_rule_step", lambda: step_args(scale=0.5)),
    "step rows": ("gated_delta_rule_step", lambda: step_args(state_indices=torch.tensor([4, -1, 0], dtype=I32))),
    "ssd step": ("ssd_step", lambda: dict(x=torch.randn(2, 4, 8), dt=torch.randn(2, 4), A=-torch.rand(4),
                                          B=torch.randn(2, 1, 16), C=torch.randn(2, 1, 16),
                                          state=torch.randn(2, 4, 8, 16), dt_limit=[0, 10.0], dt_softplus=True)),
}


@pytest.fixture(autouse=True)
def cold():
    checkmemo.forget()
    yield
    checkmemo.forget()


@pytest.mark.parametrize("name", list(VALID))
@pytest.mark.parametrize("checked", ["1", "0"])
def test_a_remembered_signature_gives_the_same_arguments(name, checked, monkeypatch):
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", checked)
    op, make = VALID[name]
    args = make()
    first = make_call(op, args).args
    assert checkmemo.PASSED, "the signature was not remembered"
    again = make_call(op, args).args
    assert_same_arguments(again, first, args)


def assert_same_arguments(got: dict, want: dict, given: dict):
    """`got` holds `want`'s arguments: its tensors the same objects (a default filled in: equal), its other values
    of the same types and equal."""
    assert got.keys() == want.keys()
    for n, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[n] is v or (given.get(n) is None and torch.equal(got[n], v)), n
        else:
            assert type(got[n]) is type(v) and got[n] == v, n


def error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def entry(name, where, value):
    """A spoiler that sets one entry of the index tensor `name` (on a copy)."""
    def spoil(a):
        a[name] = a[name].clone()
        a[name][where] = value
    return spoil


bad_block_id = entry("block_table", (1, 2), 8)


def long_sequence(a):
    a["seqused_k"] = torch.tensor([9, 13, 5], dtype=I32)


def short_max(a):
    a["max_seqlen_k"] = 11


def out_overlaps(a):
    a["out"] = a["q"]


def int_for_bool(a):
    a["causal"] = 1


def float_window(a):
    a["window_size"] = [2.0, 0]


def twice_a_row(a):
    a["state_indices"] = torch.tensor([4, 4, 0], dtype=I32)


def row_out_of_range(a):
    a["state_indices"] = torch.tensor([4, 5, 0], dtype=I32)


def bad_cu(a):
    a["cu_seqlens_q"] = torch.tensor([0, 3, 5], dtype=I32)


def slot_twice(a):
    a["slot_mapping"] = torch.tensor([5, 9, 9], dtype=torch.int64)


# (valid call, how it goes bad without changing its signature's shapes)
BAD = {
    "slot twice": ("write", slot_twice),
    "key range": ("sparse", entry("indices", (3, 1, 0), 6)),
    "key twice": ("sparse", entry("indices", (2, 0, 1), 0)),
    "block id": ("paged", bad_block_id),
    "key count": ("paged", long_sequence),
    "max_seqlen_k": ("paged", short_max),
    "out overlaps": ("attention", out_overlaps),
    "int for bool": ("attention", int_for_bool),
    "float window": ("attention", float_window),
    "row twice": ("step rows", twice_a_row),
    "row range": ("step rows", row_out_of_range),
    "cu values": ("attention varlen", bad_cu),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("via", ["make_call", "public"])
def test_a_warm_memo_gives_the_same_errors(name, via):
    valid, spoil = BAD[name]
    op, make = VALID[valid]

    def call(a):
        return make_call(op, a) if via == "make_call" else getattr(pa, op)(**a, backend="cpu")

    bad = make()
    spoil(bad)
    cold = error(lambda: call(bad))
    call(make())  # the valid call of the same shapes, remembered
    assert checkmemo.PASSED
    assert error(lambda: call(bad)) == cold


def test_turning_value_checks_back_on_checks_values(monkeypatch):
    bad = paged_args()
    bad_block_id(bad)
    cold = error(lambda: pa.paged_attention(**bad))
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", "0")
    pa.paged_attention(**paged_args())
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", "1")
    assert error(lambda: pa.paged_attention(**bad)) == cold


def test_the_sign_of_a_zero_scale_is_kept():
    make_call("attention", attn_args(softmax_scale=0.0))
    scale = make_call("attention", attn_args(softmax_scale=-0.0)).args["softmax_scale"]
    assert str(scale) == "-0.0"


def test_a_remembered_choice_still_refuses_grad():
    args = step_args()
    with torch.no_grad():
        pa.gated_delta_rule_step(**args, backend="cpu")
    args["q"].requires_grad_(True)
    with pytest.raises(NotSupported, match="inference only"):
        pa.gated_delta_rule_step(**args, backend="cpu")


def warm(op, args):
    """Call `op` until its calls take the fast path (checkmemo.FAST): the first is checked, the second keeps
    its tensors' guard. Returns the result of the last."""
    for _ in range(2):
        got = getattr(pa, op)(**args, backend="cpu")
    assert checkmemo.FAST, "the call was not kept"
    return got


@fast_path
@pytest.mark.parametrize("name", list(VALID))
@pytest.mark.parametrize("checked", ["1", "0"])
def test_a_kept_call_passes_the_checked_arguments(name, checked, monkeypatch):
    """The backend's function gets, on the fast path, the arguments the full checks give (make_call)."""
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", checked)
    op, make = VALID[name]
    impl, seen = registry.get("cpu").impl(), []
    real = getattr(impl, op)
    monkeypatch.setattr(impl, op, lambda **a: seen.append(a) or real(**a))
    args = make()
    for _ in range(3):
        getattr(pa, op)(**args, backend="cpu")
    assert checkmemo.FAST, "the call was not kept"
    assert_same_arguments(seen[-1], make_call(op, args).args, args)


@fast_path
def test_a_kept_call_skips_its_signature():
    """A third call is answered from FAST: the signatures' store, emptied, stays empty."""
    args = step_args(state_indices=torch.tensor([4, -1, 0], dtype=I32))
    state = args["state"].clone()
    warm("gated_delta_rule_step", args)
    checkmemo.PASSED.clear()
    args["state"] = state.clone()
    got = pa.gated_delta_rule_step(**args, backend="cpu")
    assert not checkmemo.PASSED
    args["state"] = state.clone()
    checkmemo.forget()
    torch.testing.assert_close(got, pa.gated_delta_rule_step(**args, backend="cpu"), rtol=0, atol=0)


def narrowed(q):
    """q viewing every other element of a new buffer: the same shape, other strides."""
    wide = torch.randn(*q.shape[:-1], 2 * q.shape[-1])
    q.set_(wide.untyped_storage(), 0, q.shape, (wide.stride(0), wide.stride(1), 2))


# How a kept call's tensor object changes in place before the next call, and what that call must do.
IN_PLACE = {
    "resize": (lambda q: q.resize_(3, 2, 7), "ValueError"),  # head dims of q and k differ: refused as cold
    "strides": (narrowed, None),  # the same signature: the right answer
    "requires_grad": (lambda q: q.requires_grad_(True), "NotSupported"),
}


@fast_path
@pytest.mark.parametrize("change", list(IN_PLACE))
def test_a_kept_call_whose_tensor_changed_in_place_is_checked(change):
    """The same tensor objects with a new shape (resize_), strides (set_) or requires_grad get what a new call
    of those tensors gets."""
    spoil, refused = IN_PLACE[change]
    args = step_args()
    warm("gated_delta_rule_step", args)
    spoil(args["q"])
    fresh = step_args() | dict(q=args["q"].detach().clone().requires_grad_(args["q"].requires_grad))
    if refused:
        checkmemo.forget()
        cold = error(lambda: pa.gated_delta_rule_step(**fresh, backend="cpu"))
        assert cold[0].__name__ == refused
        warm("gated_delta_rule_step", step_args())
        assert error(lambda: pa.gated_delta_rule_step(**args, backend="cpu")) == cold
    else:
        args["state"] = step_args()["state"]  # the warm calls updated it
        want = pa.gated_delta_rule_step(**fresh, backend="reference")
        torch.testing.assert_close(pa.gated_delta_rule_step(**args, backend="cpu"), want)


@fast_path
def test_alternating_signatures_keep_their_guards(monkeypatch):
    """Two batch sizes of one op and options (the same items) alternate: each builds its tensors' guard once."""
    built = []

    def counted(*tensors, **kwargs):
        built.append(tensors)
        return GUARDS(*tensors, **kwargs)
    monkeypatch.setattr(checkmemo, "TensorGuards", counted)
    small, large = attn_args(), attn_args() | dict(q=torch.randn(9, 4, 16))
    for args in (small, small, large, large):
        pa.attention(**args, backend="cpu")
    assert len(built) == 2 and len(checkmemo.GUARDS) == 2 and len(checkmemo.FAST) == 1
    for args in (small, large) * 3:
        got = pa.attention(**args, backend="cpu")
    assert len(built) == 2
    torch.testing.assert_close(got, pa.attention(**large, backend="reference"))


@fast_path
def test_a_kept_call_replaced_at_the_limit_keeps_the_others(monkeypatch):
    """At LIMIT, a call kept again under items already held replaces that entry alone."""
    monkeypatch.setattr(checkmemo, "LIMIT", 2)
    warm("gated_delta_rule_step", step_args())
    small, large = attn_args(), attn_args() | dict(q=torch.randn(9, 4, 16))
    for args in (small, small, large, large, small):
        pa.attention(**args, backend="cpu")
    assert [items[0] for items in checkmemo.FAST] == ["gated_delta_rule_step", "attention"]


@fast_path
def test_grad_mode_does_not_reach_kept_calls_with_grad():
    """Calls with a tensor that requires grad are not kept (a kept call's items leave grad mode out): run under
    no_grad, then refused in grad mode; a kept call without one runs in either mode."""
    args = step_args()
    args["q"].requires_grad_(True)
    with torch.no_grad():
        for _ in range(3):
            pa.gated_delta_rule_step(**args, backend="cpu")
    assert checkmemo.PASSED and not checkmemo.FAST
    with pytest.raises(NotSupported, match="inference only"):
        pa.gated_delta_rule_step(**args, backend="cpu")
    args = step_args()
    warm("gated_delta_rule_step", args)
    args["state"] = step_args()["state"]
    with torch.no_grad():
        got = pa.gated_delta_rule_step(**args, backend="cpu")
    torch.testing.assert_close(got, pa.gated_delta_rule_step(**step_args(), backend="reference"))


def refusing_guard(*tensors, **kwargs):
    raise SystemError("a guard built with other arguments")


@pytest.mark.parametrize("guard", [None, refusing_guard], ids=["no guard", "guard refuses"])
def test_without_a_usable_guard_calls_take_their_signature(guard, monkeypatch):
    """A torch without dynamo's guards, or one whose guard takes other arguments: no call is kept, each is right."""
    monkeypatch.setattr(checkmemo, "TensorGuards", guard)
    args = step_args()
    state = args["state"].clone()
    for _ in range(3):
        args["state"] = state.clone()
        got = pa.gated_delta_rule_step(**args, backend="cpu")
    assert checkmemo.PASSED and not checkmemo.FAST
    torch.testing.assert_close(got, pa.gated_delta_rule_step(**args | dict(state=state.clone()), backend="reference"))


def test_a_call_with_one_tensor_twice_is_not_kept():
    """Dynamo's guard refuses a tensor given twice: such a call takes its signature every time."""
    x = torch.randn(6, 2, 16)
    for _ in range(3):
        got = pa.attention(x, x, x, causal=True, backend="cpu")
    assert checkmemo.PASSED and not checkmemo.FAST
    torch.testing.assert_close(got, pa.attention(x, x.clone(), x.clone(), causal=True, backend="reference"))


def test_a_remembered_choice_follows_the_environment(monkeypatch):
    """PORTABLE_ATTN_BACKEND set after a call with the default choice is obeyed by the next call."""
    args = step_args()
    pa.gated_delta_rule_step(**args)
    monkeypatch.setenv("PORTABLE_ATTN_BACKEND", "reference")
    seen = []
    reference = registry.get("reference").impl()
    monkeypatch.setattr(reference, "gated_delta_rule_step", lambda **a: seen.append(a) or a["v"])
    pa.gated_delta_rule_step(**args)
    assert len(seen) == 1


def test_rediscovering_backends_forgets_signatures():
    make_call("attention", attn_args())
    registry.rediscover()
    assert not checkmemo.PASSED


def test_the_memo_keeps_its_newest_signatures(monkeypatch):
    monkeypatch.setattr(checkmemo, "LIMIT", 2)
    for t in (4, 5, 6):
        make_call("attention", attn_args() | dict(q=torch.randn(t, 4, 16)))
    assert [key[1][0] for key in checkmemo.PASSED] == [5, 6]  # q's shape, the first tensor's after the items


@pytest.mark.parametrize("checked", ["1", "0"])
def test_a_growing_max_seqlen_keeps_the_signature_and_its_value(checked, monkeypatch):
    monkeypatch.setenv("PORTABLE_ATTN_CHECK", checked)
    for longest in (12, 13, 14):
        args = paged_args() | dict(max_seqlen_k=longest)
        assert make_call("paged_attention", args).args["max_seqlen_k"] == longest
    assert len(checkmemo.PASSED) == 1
    short = paged_args() | dict(max_seqlen_k=11)
    if checked == "1":
        with pytest.raises(ValueError, match=r"max_seqlen_k: 11 is shorter than the longest sequence \(12\)"):
            make_call("paged_attention", short)
    with pytest.raises(ValueError, match="max_seqlen_k: expected a non-negative int or None, got -1"):
        make_call("paged_attention", paged_args() | dict(max_seqlen_k=-1))


def test_values_of_undeclared_types_are_checked_but_not_remembered():
    """A NumPy float where a float is declared passes the checks (a real number) and gets the same result,
    but its signature is not kept: only plain Python values are."""
    np = pytest.importorskip("numpy")
    args = attn_args(softcap=np.float64(2.0))
    got = pa.attention(**args, backend="cpu")
    assert not checkmemo.PASSED
    torch.testing.assert_close(got, pa.attention(**attn_args(softcap=2.0), backend="cpu"))


def test_public_ops_keep_their_declared_signatures_and_docs():
    """The public ops are generated (dispatch.entry): name, docstring and defaults are the declared ones."""
    import inspect
    assert pa.attention.__name__ == "attention" and pa.attention.__doc__.startswith("Scaled dot-product")
    params = inspect.signature(pa.causal_conv1d).parameters
    assert params["bias"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and params["bias"].default is None
    assert params["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match="unexpected keyword argument 'causl'"):
        pa.attention(*attn_args().values(), causl=True)
