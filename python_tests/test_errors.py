"""Contract §1.3: every bad argument raises the named exception type before any kernel runs, with a message that names
the argument (and its bad value where it has one). Checked for every backend, through the Python front door, through
torch.ops.mob, and at the C++ extension's own boundary."""

from __future__ import annotations

import pytest
import torch

import mob_kernels
from mob_kernels import BackendUnavailableError
from mob_testing import backends

V = torch.randn(2, 10, 8)
P = torch.randn(2, 3, 8)
M = torch.ones(2, 3, dtype=torch.bool)

# (id, kwargs overriding the good call, exception type, words the message must contain)
SELECT_ERRORS = [
    ("k>N", dict(k=11), ValueError, ["k", "11"]),
    ("k_p>k", dict(k_p=5, k=4), ValueError, ["k_p", "5"]),
    ("k<0", dict(k=-1, k_p=0), ValueError, ["k", "-1"]),
    ("k_p<0", dict(k_p=-2), ValueError, ["k_p", "-2"]),
    ("fold<0", dict(fold=-3), ValueError, ["fold", "-3"]),
    ("k float", dict(k=4.0), TypeError, ["k", "float"]),
    ("k_p bool", dict(k_p=True), TypeError, ["k_p", "bool"]),
    ("fold str", dict(fold="2"), TypeError, ["fold"]),
    ("d mismatch", dict(prompt=torch.randn(2, 3, 7)), ValueError, ["prompt", "7", "8"]),
    ("batch mismatch", dict(prompt=torch.randn(3, 3, 8), prompt_mask=None), ValueError, ["prompt", "3", "2"]),
    ("vis rank 1", dict(vis=torch.randn(8), prompt=torch.randn(3), prompt_mask=None, k=0, k_p=0), ValueError,
     ["vis", "(8,)"]),
    ("vis rank 4", dict(vis=torch.randn(1, 2, 10, 8)), ValueError, ["vis", "(1, 2, 10, 8)"]),
    ("prompt rank", dict(prompt=torch.randn(3, 8)), ValueError, ["prompt", "(3, 8)"]),
    ("mask shape", dict(prompt_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["prompt_mask", "(2, 4)"]),
    ("mask rank", dict(prompt_mask=torch.ones(3, dtype=torch.bool)), ValueError, ["prompt_mask", "(3,)"]),
    ("vis int", dict(vis=torch.ones(2, 10, 8, dtype=torch.int32)), TypeError, ["vis", "int32"]),
    ("vis float64", dict(vis=V.double()), TypeError, ["vis", "float64"]),
    ("prompt float64", dict(prompt=P.double()), TypeError, ["prompt", "float64"]),
    ("prompt int", dict(prompt=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, ["prompt", "int64"]),
    ("dtype mismatch", dict(prompt=P.half()), TypeError, ["prompt", "float16"]),
    ("vis not tensor", dict(vis=V.tolist()), TypeError, ["vis", "list"]),
    ("prompt not tensor", dict(prompt=None), TypeError, ["prompt", "NoneType"]),
    ("mask uint8", dict(prompt_mask=M.to(torch.uint8)), TypeError, ["prompt_mask", "uint8"]),
    ("mask float", dict(prompt_mask=M.float()), TypeError, ["prompt_mask", "float32"]),
    ("mask list", dict(prompt_mask=[[True] * 3] * 2), TypeError, ["prompt_mask", "list"]),
    # The meta device stands in for a second device on a machine with one: the check is the same.
    ("prompt device", dict(prompt=P.to("meta")), ValueError, ["prompt", "meta"]),
    ("mask device", dict(prompt_mask=M.to("meta")), ValueError, ["prompt_mask", "meta"]),
    ("vis NaN, check_finite", dict(vis=V.clone().index_fill_(1, torch.tensor([3]), float("nan")), check_finite=True),
     ValueError, ["vis", "non-finite"]),
    ("prompt inf, check_finite", dict(prompt=P.clone().fill_(float("inf")), check_finite=True), ValueError,
     ["prompt", "non-finite"]),
    ("unknown backend", dict(backend="tpu"), ValueError, ["backend", "tpu"]),
]


def _call(backend, **over):
    args = dict(vis=V, prompt=P, k_p=2, k=4, fold=None, prompt_mask=M, backend=backend, check_finite=False)
    args.update(over)
    vis, prompt, k_p, k = (args.pop(n) for n in ("vis", "prompt", "k_p", "k"))
    return mob_kernels.select(vis, prompt, k_p, k, **args)


def _assert_message(err: Exception, words) -> None:
    for w in words:
        assert w in str(err), f"{w!r} not in message: {err}"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", SELECT_ERRORS, ids=[c[0] for c in SELECT_ERRORS])
def test_select_bad_argument(backend, case):
    _, over, exc, words = case
    over = {"backend": backend, **over}
    with pytest.raises(exc) as info:
        _call(**over)
    _assert_message(info.value, words)


def test_good_call_does_not_raise():
    # The table above overrides one argument of this call at a time, so this call itself must be fine.
    for backend in backends():
        assert _call(backend).shape == (2, 4)


# Through the dispatcher: the same types and messages (the op's Python kernel raises them; nothing wraps them).
OP_ERRORS = [c for c in SELECT_ERRORS if c[0] in ("k>N", "k_p>k", "k<0", "d mismatch", "vis float64", "mask uint8",
                                                  "mask shape", "prompt device", "vis rank 4")]


@pytest.mark.parametrize("case", OP_ERRORS, ids=[c[0] for c in OP_ERRORS])
def test_op_bad_argument(case):
    _, over, exc, words = case
    args = dict(vis=V, prompt=P, k_p=2, k=4, fold=0, prompt_mask=M)
    args.update(over)
    vis, prompt, k_p, k = (args.pop(n) for n in ("vis", "prompt", "k_p", "k"))
    with pytest.raises(exc) as info:
        torch.ops.mob.select(vis, prompt, k_p, k, **args)
    _assert_message(info.value, words)


def test_backend_unavailable_names_backend():
    # cuda never runs on CPU tensors: a clear BackendUnavailableError, not a crash or a silent fallback.
    with pytest.raises(BackendUnavailableError) as info:
        mob_kernels.select(V, P, 2, 4, backend="cuda")
    _assert_message(info.value, ["backend", "cuda"])


# ----------------------------------------------------------------------------------------------- primitives (§5)


@pytest.mark.parametrize("backend", backends())
def test_prompt_cover_bad_arguments(backend):
    cases = [
        (dict(k_p=11), ValueError, ["k_p", "11"]),
        (dict(k_p=-1), ValueError, ["k_p", "-1"]),
        (dict(fold=-1), ValueError, ["fold", "-1"]),
        (dict(vis=V.double()), TypeError, ["vis", "float64"]),
        (dict(prompt=torch.randn(2, 3, 5)), ValueError, ["prompt", "5"]),
        (dict(prompt_mask=M.int()), TypeError, ["prompt_mask", "int32"]),
    ]
    for over, exc, words in cases:
        args = dict(vis=V, prompt=P, k_p=2, fold=None, prompt_mask=M, backend=backend)
        args.update(over)
        vis, prompt, k_p = (args.pop(n) for n in ("vis", "prompt", "k_p"))
        with pytest.raises(exc) as info:
            mob_kernels.prompt_cover(vis, prompt, k_p, **args)
        _assert_message(info.value, words)


@pytest.mark.parametrize("backend", backends())
def test_farthest_point_sample_bad_arguments(backend):
    cases = [
        (dict(k=11), ValueError, ["k", "11"]),
        (dict(k=-1), ValueError, ["k", "-1"]),
        (dict(vis=V.to(torch.int16)), TypeError, ["vis", "int16"]),
        (dict(seed=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)), TypeError, ["seed", "int32"]),
        (dict(seed=[[0], [1]]), TypeError, ["seed"]),
        (dict(seed=torch.tensor([0, 1])), ValueError, ["seed", "(2,)"]),
        (dict(seed=torch.zeros(3, 1, dtype=torch.int64)), ValueError, ["seed", "(3, 1)"]),
        (dict(seed=torch.tensor([[0], [10]])), ValueError, ["seed", "10"]),
        (dict(seed=torch.tensor([[0], [-2]])), ValueError, ["seed", "-2"]),
        (dict(seed=torch.tensor([[0], [1]], device="meta")), ValueError, ["seed", "meta"]),
    ]
    for over, exc, words in cases:
        args = dict(vis=V, k=3, seed=None, backend=backend)
        args.update(over)
        vis, k = args.pop("vis"), args.pop("k")
        with pytest.raises(exc) as info:
            mob_kernels.farthest_point_sample(vis, k, **args)
        _assert_message(info.value, words)


# ---------------------------------------------------------------------------------- the C++ extension's boundary


@pytest.mark.skipif("cpu" not in backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize(
    "sizes,words",
    [
        (dict(k=11), ["k", "11"]),
        (dict(k=-1, k_p=0), ["k", "-1"]),
        (dict(k_p=5, k=4), ["k_p", "5"]),
        (dict(N=-1, k=0, k_p=0), ["sizes"]),
    ],
)
def test_extension_rejects_bad_sizes_before_touching_memory(sizes, words):
    # A direct caller of mob_kernels._C (no Python checks) with null pointers: the C++ must throw (ValueError via
    # pybind11) before it dereferences anything, or this test would crash the process.
    from mob_kernels import _C

    a = dict(B=1, N=10, L=2, d=8, k_p=2, k=4, fold=0)
    a.update(sizes)
    with pytest.raises(ValueError) as info:
        _C.select_cpu(a["B"], a["N"], a["L"], a["d"], 0, 0, 0, 0, 0, 0, 0, 0, a["k_p"], a["k"], a["fold"], 0)
    _assert_message(info.value, words)


@pytest.mark.skipif("cpu" not in backends(), reason="the C++ extension is not built")
def test_extension_rejects_bad_dtype_tag():
    from mob_kernels import _C

    with pytest.raises(ValueError, match="dtype"):
        _C.select_cpu(1, 10, 2, 8, 7, 0, 0, 0, 0, 0, 0, 0, 2, 4, 0, 0)


# ----------------------------------------------------------------------------------- the other methods' arguments

R = torch.rand(2, 10)
VALID = torch.ones(2, 10, dtype=torch.bool)

METHOD_ERRORS = [  # (method, id, kwargs overriding the good call, exception, words)
    ("divprune", "k>N", dict(k=11), ValueError, ["k", "11"]),
    ("divprune", "k<0", dict(k=-1), ValueError, ["k", "-1"]),
    ("divprune", "k float", dict(k=2.0), TypeError, ["k", "float"]),
    ("divprune", "k bool", dict(k=True), TypeError, ["k", "bool"]),
    ("divprune", "vis float64", dict(vis=V.double()), TypeError, ["vis", "float64"]),
    ("divprune", "vis list", dict(vis=V.tolist()), TypeError, ["vis", "list"]),
    ("divprune", "valid shape", dict(valid=VALID[:, :9]), ValueError, ["valid", "(2, 9)"]),
    ("divprune", "valid dtype", dict(valid=VALID.int()), TypeError, ["valid", "int32"]),
    ("divprune", "valid list", dict(valid=[[True] * 10] * 2), TypeError, ["valid", "list"]),
    ("divprune", "valid device", dict(valid=VALID.to("meta")), ValueError, ["valid", "meta"]),
    ("divprune", "backend", dict(backend="tpu"), ValueError, ["backend", "tpu"]),
    ("divprune", "backend type", dict(backend=3), TypeError, ["backend", "int"]),
    ("cdpruner", "k>N", dict(k=11), ValueError, ["k", "11"]),
    ("cdpruner", "relevance shape", dict(relevance=R[:, :5]), ValueError, ["relevance", "(2, 5)"]),
    ("cdpruner", "relevance int", dict(relevance=R.long()), TypeError, ["relevance", "int64"]),
    ("cdpruner", "relevance None", dict(relevance=None), TypeError, ["relevance", "NoneType"]),
    ("cdpruner", "relevance device", dict(relevance=R.to("meta")), ValueError, ["relevance", "meta"]),
    ("cdpruner", "vis rank", dict(vis=torch.randn(10)), ValueError, ["vis", "(10,)"]),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", METHOD_ERRORS, ids=[f"{c[0]}-{c[1]}" for c in METHOD_ERRORS])
def test_method_bad_argument(backend, case):
    method, _, over, exc, words = case
    args = dict(vis=V, k=4, valid=None, backend=backend)
    if method == "cdpruner":
        args["relevance"] = R
    args.update(over)
    vis, k = args.pop("vis"), args.pop("k")
    with pytest.raises(exc) as info:
        if method == "divprune":
            mob_kernels.divprune(vis, k, **args)
        else:
            mob_kernels.cdpruner(vis, args.pop("relevance"), k, **args)
    _assert_message(info.value, words)


# ------------------------------------------------------------------- inputs that once crashed or misbehaved


def _meta(*shape):
    return torch.randn(*shape, device="meta")


def test_meta_tensors_with_the_default_backend_give_meta_results():
    """Meta tensors (data_ptr 0) used to reach the C++ and crash the process; they now take the fake path."""
    vis, prompt = _meta(2, 12, 8), _meta(2, 5, 8)
    out = mob_kernels.select(vis, prompt, 3, 6)
    assert out.device.type == "meta" and out.shape == (2, 6) and out.dtype == torch.int64
    picks, count = mob_kernels.prompt_cover(vis, prompt, 3)
    assert picks.shape == (2, 3) and count.shape == (2,)
    assert mob_kernels.farthest_point_sample(vis[0], 4).shape == (4,)
    assert mob_kernels.divprune(vis, 5).shape == (2, 5)
    assert mob_kernels.cdpruner(vis, torch.rand(2, 12, device="meta"), 5).shape == (2, 5)
    for backend in backends():  # a named backend too: shapes only, nothing runs
        assert mob_kernels.select(vis, prompt, 3, 6, backend=backend).device.type == "meta"


def test_fake_tensors_on_cpu_take_the_fake_path():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        vis, prompt = torch.randn(2, 12, 8), torch.randn(2, 5, 8)
        for out in (mob_kernels.select(vis, prompt, 3, 6), mob_kernels.divprune(vis, 4),
                    mob_kernels.cdpruner(vis, torch.rand(2, 12), 4), mob_kernels.farthest_point_sample(vis, 4)):
            assert isinstance(out, FakeTensor) and out.dtype == torch.int64


def test_fake_implementations_check_like_the_real_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vis, prompt = torch.randn(2, 12, 8), torch.randn(2, 5, 8)
        cases = [
            (lambda: torch.ops.mob.select(vis, prompt, 3, 13), ["k", "13"]),
            (lambda: torch.ops.mob.select(vis, prompt, 7, 6), ["k_p", "7"]),
            (lambda: torch.ops.mob.prompt_cover(vis, prompt, 13), ["k_p", "13"]),
            (lambda: torch.ops.mob.farthest_point_sample(vis, 13), ["k", "13"]),
            (lambda: torch.ops.mob.divprune(vis, 13), ["k", "13"]),
            (lambda: torch.ops.mob.cdpruner(vis, torch.rand(2, 11), 3), ["relevance", "(2, 11)"]),
        ]
        for call, words in cases:
            with pytest.raises(ValueError) as info:
                call()
            _assert_message(info.value, words)


def test_make_fx_real_records_the_op_and_replays_it():
    from torch.fx.experimental.proxy_tensor import make_fx

    vis, prompt = torch.randn(2, 12, 8), torch.randn(2, 5, 8)
    rel = torch.rand(2, 12)
    fns = [
        lambda v, p, r: mob_kernels.select(v, p, 3, 6),
        lambda v, p, r: mob_kernels.divprune(v, 5),
        lambda v, p, r: mob_kernels.cdpruner(v, r, 5),
    ]
    for fn in fns:
        g = make_fx(fn, tracing_mode="real")(vis, prompt, rel)
        assert "torch.ops.mob." in g.code
        v2, p2, r2 = torch.randn(2, 12, 8), torch.randn(2, 5, 8), torch.rand(2, 12)
        assert torch.equal(g(v2, p2, r2), fn(v2, p2, r2))


@pytest.mark.parametrize("backend", backends())
def test_any_int_fold_is_clamped_to_n(backend):
    vis, prompt = torch.randn(2, 10, 8), torch.randn(2, 3, 8)
    want = mob_kernels.select(vis, prompt, 3, 6, fold=10, backend=backend)
    for fold in (11, 2**31, 2**63, 2**70):
        assert torch.equal(mob_kernels.select(vis, prompt, 3, 6, fold=fold, backend=backend), want)
        got, _ = mob_kernels.prompt_cover(vis, prompt, 3, fold=fold, backend=backend)
        assert torch.equal(got, mob_kernels.prompt_cover(vis, prompt, 3, fold=10, backend=backend)[0])


def test_check_finite_looks_only_at_rows_that_take_part():
    vis, prompt = torch.randn(2, 10, 8), torch.randn(2, 3, 8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    prompt[1, 2] = float("nan")  # a masked-out row: every backend ignores it, so check_finite does too
    out = mob_kernels.select(vis, prompt, 2, 4, prompt_mask=mask, check_finite=True)
    assert torch.equal(out, mob_kernels.select(vis, prompt, 2, 4, prompt_mask=mask))
    prompt[0, 1] = float("nan")  # a row that takes part
    with pytest.raises(ValueError, match="prompt"):
        mob_kernels.select(vis, prompt, 2, 4, prompt_mask=mask, check_finite=True)


def test_one_integer_rule_for_front_door_and_op():
    """Integers are Python ints or NumPy integers, on both paths; a bool is refused by every check of ours. (torch's
    schema parser turns a bool into 0/1 before torch.ops.mob.* reaches our code, so there it cannot be told apart.)"""
    np = pytest.importorskip("numpy")
    from mob_kernels import checks

    want = mob_kernels.select(V, P, 2, 4)
    assert torch.equal(mob_kernels.select(V, P, np.int64(2), np.int32(4)), want)
    assert torch.equal(torch.ops.mob.select(V, P, np.int64(2), np.int32(4)), want)
    assert torch.equal(mob_kernels.divprune(V, np.int16(4)), mob_kernels.divprune(V, 4))
    for bad in (True, 2.0, "2", torch.tensor(2)):
        with pytest.raises(TypeError, match="k"):
            checks.as_int("k", bad)
        with pytest.raises(TypeError, match="k"):
            mob_kernels.select(V, P, 2, bad)
