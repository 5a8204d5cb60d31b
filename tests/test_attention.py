"""Shared-prefix attention (`opsd_kernels.attention`): the public function and the registered
ops, on both backends, against the float64 oracle `naive_prefix_attention` (inputs and
comparisons: attention_cases.py); padding, empty groups, determinism, opcheck, torch.compile,
argument checks and backend choice. The PyTorch forms alone: test_attention_torch.py; the Triton
launchers alone: test_attention_triton.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_cases import (
    BACKENDS,
    CASES,
    FORMS,
    NAMES,
    Case,
    compare,
    leaves_of,
    make_inputs,
    oracle,
    ours,
    plain,
    use_form,
)
from conftest import HAS_TRITON, LOW_PRECISION, assert_close, generator

from opsd_kernels.attention import (
    shared_prefix_attention,
    shared_prefix_attention_backward_op,
    shared_prefix_attention_op,
)
from opsd_kernels.reference.attention import naive_prefix_attention

REPO_ROOT = Path(__file__).resolve().parents[1]
# The interpreter evaluates exp2 on lanes that tl.where then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# --- both backends against the float64 oracle ---------------------------------------------------


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle_fp32(seed: int, backend: str, case_name: str) -> None:
    inp = make_inputs(seed, CASES[case_name])
    compare(ours(inp, backend), oracle(inp), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_flash_attention_rule(seed: int, backend: str, dtype: torch.dtype) -> None:
    inp = make_inputs(seed, CASES["gqa_ragged"], dtype)
    compare(ours(inp, backend), oracle(inp), dtype, baseline=plain(inp))


def test_float64_gradcheck_torch_backend(seed: int) -> None:
    """The analytic backward of the torch backend, by finite differences."""
    case = Case(2, 2, 1, 3, 3, 4, (1, 1), 2, (2, 3), (3, 2))
    inp = make_inputs(seed, case, torch.float64)
    leaves = list(leaves_of(inp, torch.float64).values())

    def fn(*xs):
        return shared_prefix_attention(*xs, inp.group_index, inp.prefix_lengths,
                                       inp.suffix_lengths, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_output(seed: int, backend: str) -> None:
    inp = make_inputs(seed, CASES["gqa_ragged"])
    leaves = leaves_of(inp, torch.float64)
    args64 = (*leaves.values(), inp.group_index, inp.prefix_lengths, inp.suffix_lengths)
    _, want = naive_prefix_attention(*args64, return_lse=True)
    args = [x.detach().float() for x in leaves.values()]
    out, lse = shared_prefix_attention_op(*args, inp.group_index, inp.prefix_lengths,
                                          inp.suffix_lengths, 16**-0.5, backend)
    assert lse.dtype == torch.float32 and lse.is_contiguous() and out.is_contiguous()
    assert_close(lse, want, what="lse")


# --- padding, empty groups, poisoned outputs ----------------------------------------------------


# NaN in padded slots is claimed only for Triton (see the docstring below).
PADDING_CASES = [pytest.param(b, g, id=f"{b}-{name}") for b in BACKENDS
                 for g, name in ((1e4, "large"), (math.nan, "nan"))
                 if not (b == "torch" and math.isnan(g))]


@pytest.mark.parametrize("backend, garbage", PADDING_CASES)
def test_padding_is_exactly_zero(seed: int, backend: str, garbage: float) -> None:
    """Padded queries: output and dq exactly 0. Padded suffix keys, padded prefix positions and
    the prefix of a group without rows: dK = dV = 0 exactly. Garbage in the padded slots of
    every input changes nothing. The Triton kernels never load those slots, so even NaN is
    harmless; the PyTorch form multiplies them by zero probabilities, so they must be finite."""
    case = CASES["gqa_ragged"]
    inp = make_inputs(seed, case)
    want_out, want_grads = ours(inp, backend)
    sl, pl = case.suffix_lengths, case.prefix_lengths
    for i, n in enumerate(sl):
        assert (want_out[i, :, n:] == 0).all()
        assert (want_grads[0][i, :, n:] == 0).all()
        assert (want_grads[1][i, :, n:] == 0).all() and (want_grads[2][i, :, n:] == 0).all()
    for g, n in enumerate(pl):
        assert (want_grads[3][g, :, n:] == 0).all() and (want_grads[4][g, :, n:] == 0).all()
    empty = [g for g in range(case.groups) if g not in case.group_index]
    assert empty and all((want_grads[k][g] == 0).all() for k in (3, 4) for g in empty)

    for name in NAMES:
        x = inp.tensors[name].clone()
        for i, n in enumerate(sl if name in ("query", "key", "value") else pl):
            x[i, :, n:] = garbage
        if name.startswith("prefix"):
            x[empty] = garbage
        inp.tensors[name] = x
    got_out, got_grads = ours(inp, backend)
    assert torch.equal(got_out, want_out)
    for name, g_got, g_want in zip(NAMES, got_grads, want_grads, strict=True):
        assert torch.equal(g_got, g_want), f"grad of {name}"


@pytest.mark.parametrize("form", FORMS)
def test_nonfinite_grad_on_padded_queries_is_ignored(monkeypatch, seed: int, form: str) -> None:
    """The upstream gradient of padded queries (NaN here) reaches no gradient."""
    backend = use_form(monkeypatch, form)
    inp = make_inputs(seed, CASES["gqa_ragged"])
    _, want = ours(inp, backend)
    for i, n in enumerate(inp.case.suffix_lengths):
        inp.grad_out[i, :, n:] = math.nan
    _, got = ours(inp, backend)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert torch.equal(a, b), f"grad of {name}"


@pytest.mark.parametrize("form", FORMS)
def test_backward_is_deterministic(monkeypatch, seed: int, form: str) -> None:
    """Bitwise equal gradients on a rerun; the prefix ones sum over several rows per group
    (group 2 has three, not consecutive)."""
    backend = use_form(monkeypatch, form)
    inp = make_inputs(seed, CASES["gqa_ragged"])
    first, second = ours(inp, backend), ours(inp, backend)
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_prefix_skips_prefix_gradients(seed: int, backend: str) -> None:
    """A detached prefix (the teacher reading the student's prefix K/V): suffix gradients are
    unchanged and no prefix gradient is formed."""
    inp = make_inputs(seed, CASES["gqa_ragged"])
    _, want = ours(inp, backend)
    leaves = leaves_of(inp, torch.float32)
    leaves["prefix_key"].requires_grad_(False)
    leaves["prefix_value"].requires_grad_(False)
    out = shared_prefix_attention(*leaves.values(), inp.group_index, inp.prefix_lengths,
                                  inp.suffix_lengths, backend=backend)
    trainable = [leaves[n] for n in NAMES[:3]]
    got = torch.autograd.grad(out, trainable, inp.grad_out.float())
    for a, b in zip(got, want[:3], strict=True):
        torch.testing.assert_close(a, b)


def test_empty_batch() -> None:
    q = torch.randn(0, 2, 3, 8, requires_grad=True)
    k, v = torch.randn(0, 1, 3, 8), torch.randn(0, 1, 3, 8)
    pk = torch.randn(2, 1, 4, 8, requires_grad=True)
    pv = torch.randn(2, 1, 4, 8, requires_grad=True)
    for backend in BACKENDS:
        out = shared_prefix_attention(q, k, v, pk, pv, torch.zeros(0, dtype=torch.int64),
                                      backend=backend)
        assert out.shape == (0, 2, 3, 8)
        gpk, gpv = torch.autograd.grad(out.sum(), (pk, pv))
        assert (gpk == 0).all() and (gpv == 0).all()


# --- registered ops and torch.compile -----------------------------------------------------------


def _op_args(seed: int, backend: str) -> tuple:
    # Small (opcheck runs the op a dozen times, interpreted for Triton), with GQA, ragged
    # lengths and an empty group.
    inp = make_inputs(seed, Case(2, 4, 2, 5, 3, 16, (2, 2), 3, (2, 1, 3), (5, 3)))
    x = [t.float().requires_grad_() for t in inp.tensors.values()]
    return (*x, inp.group_index, inp.prefix_lengths, inp.suffix_lengths, 0.3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(seed: int, backend: str) -> None:
    args = _op_args(seed, backend)
    torch.library.opcheck(shared_prefix_attention_op, args, raise_exception=True)
    out, lse = shared_prefix_attention_op(*args)
    plain_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bwd_args = (torch.randn_like(out), *plain_args[:8], out.detach(), lse, 0.3, backend)
    for prefix_grad in (True, False):
        torch.library.opcheck(shared_prefix_attention_backward_op, (*bwd_args, prefix_grad),
                              raise_exception=True)


def _loss(q, k, v, pk, pv, gi, pl, sl):
    out = shared_prefix_attention(q, k, v, pk, pv, gi, pl, sl, backend="torch")
    return (out.float().tanh() * torch.linspace(-1, 1, out.shape[-1])).sum()


@pytest.mark.parametrize("use_compile", [False, True])
def test_compiled_function(seed: int, use_compile: bool) -> None:
    inp = make_inputs(seed, CASES["gqa_ragged"])
    ints = (inp.group_index, inp.prefix_lengths, inp.suffix_lengths)
    fn = _loss
    if use_compile:
        torch._dynamo.reset()
        fn = torch.compile(_loss, fullgraph=True)
    leaves = list(leaves_of(inp, torch.float32).values())
    got = torch.autograd.grad(fn(*leaves, *ints), leaves)
    ref_leaves = list(leaves_of(inp, torch.float64).values())
    out = naive_prefix_attention(*ref_leaves, *ints)
    want_loss = (out.tanh() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum()
    want = torch.autograd.grad(want_loss, ref_leaves)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert_close(a, b, what=f"grad of {name}")


# --- backend choice and validation --------------------------------------------------------------


def _valid_args() -> dict:
    g = generator(0)
    return dict(query=torch.randn(3, 4, 5, 8, generator=g),
                key=torch.randn(3, 2, 5, 8, generator=g),
                value=torch.randn(3, 2, 5, 8, generator=g),
                prefix_key=torch.randn(2, 2, 6, 8, generator=g),
                prefix_value=torch.randn(2, 2, 6, 8, generator=g),
                group_index=torch.tensor([0, 1, 1]))


def _set(name, value):
    return lambda a: a.__setitem__(name, value)


def _reshape(name, *shape):
    return lambda a: a.__setitem__(name, a[name].reshape(*shape))


BAD = {
    "query_dims": ("query", _reshape("query", 3, 4, 40)),
    "query_dtype_int": ("query", lambda a: a.__setitem__("query", a["query"].long())),
    "key_dtype_mismatch": ("key", lambda a: a.__setitem__("key", a["key"].half())),
    "key_shape": ("key", lambda a: a.__setitem__("key", a["key"][:, :, :4])),
    "value_batch": ("value", lambda a: a.__setitem__("value", a["value"][:2])),
    "heads_not_multiple": ("query", lambda a: a.__setitem__("query", a["query"][:, :3])),
    "prefix_head_dim": ("prefix_key", lambda a: a.__setitem__("prefix_key",
                                                              a["prefix_key"][..., :4])),
    "prefix_value_shape": ("prefix_value", lambda a: a.__setitem__("prefix_value",
                                                                   a["prefix_value"][:, :, :5])),
    "group_index_float": ("group_index", _set("group_index", torch.tensor([0.0, 1.0, 1.0]))),
    "group_index_shape": ("group_index", _set("group_index", torch.tensor([0, 1]))),
    "group_index_range": ("group_index", _set("group_index", torch.tensor([0, 2, 1]))),
    "group_index_negative": ("group_index", _set("group_index", torch.tensor([0, -1, 1]))),
    "prefix_lengths_zero": ("prefix_lengths", _set("prefix_lengths", torch.tensor([0, 6]))),
    "prefix_lengths_long": ("prefix_lengths", _set("prefix_lengths", torch.tensor([7, 6]))),
    "prefix_lengths_shape": ("prefix_lengths", _set("prefix_lengths", torch.tensor([3]))),
    "suffix_lengths_zero": ("suffix_lengths", _set("suffix_lengths", torch.tensor([5, 0, 5]))),
    "suffix_lengths_long": ("suffix_lengths", _set("suffix_lengths", torch.tensor([5, 6, 5]))),
    "scale_nan": ("scale", _set("scale", math.nan)),
    "scale_negative": ("scale", _set("scale", -1.0)),
    "backend_native": ("backend", _set("backend", "native")),
    "backend_typo": ("backend", _set("backend", "cuda")),
    "float64_triton": ("query", lambda a: a.update(
        {k: a[k].double() for k in NAMES}, backend="triton")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_name_the_argument(case: str) -> None:
    name, change = BAD[case]
    if case == "float64_triton" and not HAS_TRITON:
        pytest.skip("Triton is not usable here")
    args = _valid_args()
    change(args)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        shared_prefix_attention(**args)


def test_devices_must_match() -> None:
    args = _valid_args()
    args["key"] = args["key"].to("meta")
    with pytest.raises(ValueError, match=r"^key\b"):
        shared_prefix_attention(**args)
    args = _valid_args()
    args["group_index"] = args["group_index"].to("meta")
    with pytest.raises(ValueError, match=r"^group_index\b"):
        shared_prefix_attention(**args)


def test_auto_backend_on_cpu_is_torch(monkeypatch) -> None:
    calls = []
    import opsd_kernels.attention as attention

    real = attention._forward
    monkeypatch.setattr(attention, "_forward",
                        lambda *a: calls.append(a[-1]) or real(*a))
    args = _valid_args()
    for env in (None, "native", "torch"):
        if env is None:
            monkeypatch.delenv("OPSD_BACKEND", raising=False)
        else:
            monkeypatch.setenv("OPSD_BACKEND", env)
        shared_prefix_attention(**args)
    assert calls == ["torch"] * 3


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    """bench/bench_attention.py still runs (tiny shapes, one round)."""
    raw = tmp_path / "attention.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "bench/bench_attention.py", f"--benchmark-json={raw}"],
        cwd=REPO_ROOT, env=dict(os.environ, OPSD_BENCH_SMOKE="1"), capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert raw.exists()
