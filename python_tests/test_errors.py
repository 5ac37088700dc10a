"""SPEC.md §3: every bad argument raises the named exception type before any kernel runs, with a message that names
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
        (dict(fold=-1), ["fold", "-1"]),
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
