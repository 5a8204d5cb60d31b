"""Shared-prefix attention (`opsd_kernels.attention`) on both backends against the float64 oracle
`naive_prefix_attention`, which concatenates [prefix of the row's group; suffix] per row.

Every test draws fresh random inputs (a seed per test), rounds them to the test dtype once, and
checks the output and all five gradients: fp32 within `TOL`, bf16 / fp16 by the flash-attention
rule against plain PyTorch in that dtype. The Triton kernels run under the interpreter on CPU, so
sizes stay tiny: odd lengths (R = 7, P = 5), D not a power of two, GQA and MQA, ragged prefix and
suffix lengths, groups of 1 and 3 rows and a group without rows.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    DEVICE,
    HAS_TRITON,
    LOW_PRECISION,
    assert_close,
    assert_fa_rule,
    generator,
    randn,
    requires_triton,
)

import opsd_kernels.attention as attention_module
from opsd_kernels.attention import (
    shared_prefix_attention,
    shared_prefix_attention_backward_op,
    shared_prefix_attention_op,
)
from opsd_kernels.reference.attention import (
    fused_prefix_attention,
    fused_prefix_attention_backward,
    naive_prefix_attention,
    prefix_attention_backward,
    prefix_attention_parts,
    sdpa_prefix_attention,
)

# The attention op has a PyTorch and a Triton backend (no native kernel).
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ("query", "key", "value", "prefix_key", "prefix_value")
# The interpreter evaluates exp2 on lanes that tl.where then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@dataclass(frozen=True)
class Case:
    b: int
    hq: int
    hkv: int
    r: int
    p: int
    d: int
    group_index: tuple[int, ...]
    groups: int
    prefix_lengths: tuple[int, ...] | None = None
    suffix_lengths: tuple[int, ...] | None = None
    strided: bool = False  # q / k / v as [B, R, H, D] tensors viewed as [B, H, R, D]


CASES = {
    # Group 2 has 3 rows, group 0 one, group 1 none; ragged prefixes and suffixes (one of
    # length 1); GQA 4 / 2.
    "gqa_ragged": Case(4, 4, 2, 7, 5, 16, (2, 0, 2, 2), 3, (5, 3, 2), (7, 1, 4, 6)),
    # MQA, D not a power of two, prefix longer than one tile, strided inputs.
    "mqa_d24_strided": Case(3, 4, 1, 9, 21, 24, (1, 0, 1), 2, (21, 13), (9, 9, 3), True),
    # D = 64, no lengths (all full), one group of 2 rows stacked, several suffix tiles.
    "d64_full": Case(2, 2, 2, 18, 6, 64, (0, 0), 1),
    # D = 32, every row its own group, one prefix of length 1.
    "d32_one_row_per_group": Case(3, 2, 1, 5, 4, 32, (2, 1, 0), 3, (1, 4, 3), (5, 2, 4)),
}


@dataclass
class Inputs:
    tensors: dict[str, torch.Tensor]  # float64, rounded to dtype
    group_index: torch.Tensor
    prefix_lengths: torch.Tensor | None
    suffix_lengths: torch.Tensor | None
    grad_out: torch.Tensor  # float64, random on padded rows too (they must be ignored)
    dtype: torch.dtype
    case: Case


def make_inputs(seed: int, case: Case, dtype: torch.dtype = torch.float32) -> Inputs:
    gen = generator(seed)

    def q(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).to(torch.float64).to(DEVICE)

    c = case
    shapes = {"query": (c.b, c.hq, c.r, c.d), "key": (c.b, c.hkv, c.r, c.d),
              "value": (c.b, c.hkv, c.r, c.d), "prefix_key": (c.groups, c.hkv, c.p, c.d),
              "prefix_value": (c.groups, c.hkv, c.p, c.d)}
    tensors = {k: q(randn(gen, *s, scale=1.5 if k.endswith("key") else 1.0))
               for k, s in shapes.items()}

    def ints(x):
        return None if x is None else torch.tensor(x, dtype=torch.int64, device=DEVICE)

    return Inputs(tensors, ints(c.group_index), ints(c.prefix_lengths), ints(c.suffix_lengths),
                  randn(gen, c.b, c.hq, c.r, c.d).to(DEVICE), dtype, case)


def _leaves(inp: Inputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, x in inp.tensors.items():
        if inp.case.strided and name in ("query", "key", "value"):
            # A [B, R, H, D] tensor seen as [B, H, R, D], as Hugging Face hands them over.
            x = x.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
            assert not x.is_contiguous() or x.shape[1] == 1
            out[name] = x.detach().requires_grad_()
        else:
            out[name] = x.detach().to(dtype, copy=True).requires_grad_()
    return out


def run(fn, inp: Inputs, dtype: torch.dtype, **kwargs) -> tuple[torch.Tensor, list]:
    leaves = _leaves(inp, dtype)
    out = fn(*leaves.values(), inp.group_index, inp.prefix_lengths, inp.suffix_lengths,
             **kwargs)
    grads = torch.autograd.grad(out, list(leaves.values()), inp.grad_out.to(out.dtype))
    return out.detach(), list(grads)


def oracle(inp: Inputs) -> tuple[torch.Tensor, list]:
    return run(naive_prefix_attention, inp, torch.float64)


def plain(inp: Inputs) -> tuple[torch.Tensor, list]:
    """Plain PyTorch in the test dtype (scores and values in dtype, softmax in fp32)."""
    return run(naive_prefix_attention, inp, inp.dtype, upcast=False)


def ours(inp: Inputs, backend: str) -> tuple[torch.Tensor, list]:
    return run(shared_prefix_attention, inp, inp.dtype, backend=backend)


def _compare(got, want, dtype, baseline=None) -> None:
    (out, grads), (ref_out, ref_grads) = got, want
    assert out.dtype == dtype
    pairs = [("out", out, ref_out, False)] + [
        (f"grad of {n}", g, rg, True) for n, g, rg in zip(NAMES, grads, ref_grads, strict=True)]
    for i, (what, mine, expected, backward) in enumerate(pairs):
        assert mine.dtype == dtype, f"{what}: dtype {mine.dtype}"
        assert mine.shape == expected.shape, f"{what}: shape {mine.shape}"
        if baseline is not None:
            base = baseline[0] if i == 0 else baseline[1][i - 1]
            assert_fa_rule(mine, base, expected, backward=backward, what=what)
        if dtype == torch.float64:  # the other oracles: float64 rounding only
            torch.testing.assert_close(mine, expected, msg=lambda m, w=what: f"{w}: {m}")
        else:
            assert_close(mine, expected, dtype, what=what)


# --- the oracles agree with each other --------------------------------------------------------


@pytest.mark.parametrize("case_name", list(CASES))
def test_two_part_reference_and_sdpa_match_naive(seed: int, case_name: str) -> None:
    inp = make_inputs(seed, CASES[case_name], torch.float64)
    want = oracle(inp)
    _compare(run(lambda *a: prefix_attention_parts(*a)[0], inp, torch.float64), want,
             torch.float64)
    _compare(run(sdpa_prefix_attention, inp, torch.float64), want, torch.float64)
    _compare(run(lambda *a: prefix_attention_parts(*a, chunk_size=1)[0], inp, torch.float64),
             want, torch.float64)
    leaves = _leaves(inp, torch.float64)
    args = (*leaves.values(), inp.group_index, inp.prefix_lengths, inp.suffix_lengths)
    _, lse_naive = naive_prefix_attention(*args, return_lse=True)
    torch.testing.assert_close(prefix_attention_parts(*args)[1], lse_naive)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_analytic_backward_matches_autograd(seed: int, chunk_size: int | None) -> None:
    """`prefix_attention_backward` (the torch backend's backward off CPU) against autograd
    through the two-part form, for any chunking of the rows."""
    case = CASES["gqa_ragged"]
    inp = make_inputs(seed, case, torch.float64)
    want_out, want = run(lambda *a: prefix_attention_parts(*a)[0], inp, torch.float64)
    x = [t.detach() for t in _leaves(inp, torch.float64).values()]
    ints = (inp.group_index, torch.tensor(case.prefix_lengths),
            torch.tensor(case.suffix_lengths))
    out, lse = prefix_attention_parts(*x, *ints, chunk_size=chunk_size)
    torch.testing.assert_close(out, want_out)
    got = prefix_attention_backward(inp.grad_out, *x, *ints, out, lse, case.d**-0.5,
                                    chunk_size=chunk_size)
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("case_name", list(CASES))
def test_fused_form_matches_autograd(seed: int, case_name: str) -> None:
    """`fused_prefix_attention` and its backward (the torch backend on CPU) in float64 against
    the oracle's output, lse and autograd gradients: groups whose rows are consecutive (a
    slice) and scattered (a gather), GQA / MQA, strided inputs, ragged lengths."""
    case = CASES[case_name]
    inp = make_inputs(seed, case, torch.float64)
    want_out, want = oracle(inp)
    leaves = _leaves(inp, torch.float64)
    x = [t.detach() for t in leaves.values()]
    ints = (inp.group_index, inp.prefix_lengths, inp.suffix_lengths)
    _, want_lse = naive_prefix_attention(*x, *ints, return_lse=True)
    out, lse = fused_prefix_attention(*x, *ints)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    b, r, g, p = case.b, case.r, case.groups, case.p
    full = torch.full((b,), r), torch.full((g,), p)
    sl = inp.suffix_lengths if inp.suffix_lengths is not None else full[0]
    pl = inp.prefix_lengths if inp.prefix_lengths is not None else full[1]
    got = fused_prefix_attention_backward(inp.grad_out, *x, inp.group_index, pl, sl, out, lse,
                                          case.d**-0.5)
    for name, a, w in zip(NAMES, got, want, strict=True):
        assert a.is_contiguous(), f"grad of {name}: not contiguous"
        torch.testing.assert_close(a, w, msg=lambda m, n=name: f"grad of {n}: {m}")
    no_prefix = fused_prefix_attention_backward(inp.grad_out, *x, inp.group_index, pl, sl, out,
                                                lse, case.d**-0.5, prefix_grad=False)
    assert no_prefix[3] is None and no_prefix[4] is None
    for a, w in zip(no_prefix[:3], got[:3], strict=True):
        assert torch.equal(a, w)


@pytest.mark.parametrize("dtype", (torch.float32, *LOW_PRECISION), ids=str)
@pytest.mark.parametrize("case_name", list(CASES))
def test_masked_form_through_the_op(monkeypatch, seed: int, case_name: str,
                                    dtype: torch.dtype) -> None:
    """The masked chunked form, which the torch backend runs off CPU, through the op on CPU
    against the float64 oracle (fp32 within tolerance, 16-bit by the flash-attention rule)."""
    monkeypatch.setattr(attention_module, "_fused", lambda device: False)
    inp = make_inputs(seed, CASES[case_name], dtype)
    baseline = None if dtype == torch.float32 else plain(inp)
    _compare(ours(inp, "torch"), oracle(inp), dtype, baseline=baseline)


def test_cpu_runs_the_fused_form() -> None:
    assert attention_module._fused(torch.device("cpu"))
    assert not attention_module._fused(torch.device("meta"))


# --- both backends against the float64 oracle ---------------------------------------------------


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle_fp32(seed: int, backend: str, case_name: str) -> None:
    inp = make_inputs(seed, CASES[case_name])
    _compare(ours(inp, backend), oracle(inp), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_flash_attention_rule(seed: int, backend: str, dtype: torch.dtype) -> None:
    inp = make_inputs(seed, CASES["gqa_ragged"], dtype)
    _compare(ours(inp, backend), oracle(inp), dtype, baseline=plain(inp))


def test_float64_gradcheck_torch_backend(seed: int) -> None:
    """The analytic backward of the torch backend, by finite differences."""
    case = Case(2, 2, 1, 3, 3, 4, (1, 1), 2, (2, 3), (3, 2))
    inp = make_inputs(seed, case, torch.float64)
    leaves = list(_leaves(inp, torch.float64).values())

    def fn(*xs):
        return shared_prefix_attention(*xs, inp.group_index, inp.prefix_lengths,
                                       inp.suffix_lengths, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_output(seed: int, backend: str) -> None:
    inp = make_inputs(seed, CASES["gqa_ragged"])
    leaves = _leaves(inp, torch.float64)
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


@pytest.mark.parametrize("form", ["torch-fused", "torch-masked"]
                         + (["triton"] if HAS_TRITON else []))
def test_nonfinite_grad_on_padded_queries_is_ignored(monkeypatch, seed: int, form: str) -> None:
    """The upstream gradient of padded queries (NaN here) reaches no gradient."""
    if form == "torch-masked":
        monkeypatch.setattr(attention_module, "_fused", lambda device: False)
    inp = make_inputs(seed, CASES["gqa_ragged"])
    backend = form.split("-")[0]
    _, want = ours(inp, backend)
    for i, n in enumerate(inp.case.suffix_lengths):
        inp.grad_out[i, :, n:] = math.nan
    _, got = ours(inp, backend)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert torch.equal(a, b), f"grad of {name}"


@requires_triton
def test_triton_writes_every_output_element(seed: int) -> None:
    """The launchers are handed NaN-poisoned outputs: every element must be written."""
    from opsd_kernels.ops.attention import (
        shared_prefix_attention_bwd_triton_,
        shared_prefix_attention_fwd_triton_,
    )

    case = CASES["gqa_ragged"]
    inp = make_inputs(seed, case)
    x = [t.float() for t in inp.tensors.values()]
    ints = (inp.group_index, inp.prefix_lengths, inp.suffix_lengths)
    scale = case.d**-0.5
    out, lse = (torch.full_like(x[0], math.nan),
                torch.full(x[0].shape[:3], math.nan, device=DEVICE))
    shared_prefix_attention_fwd_triton_(*x, *ints, scale, out, lse)
    assert not out.isnan().any() and not lse.isnan().any()
    grads = [torch.full_like(t, math.nan) for t in x]
    shared_prefix_attention_bwd_triton_(inp.grad_out.float(), *x, *ints, out, lse, scale, *grads)
    for name, g in zip(NAMES, grads, strict=True):
        assert not g.isnan().any(), f"grad of {name}: some elements were not written"
    want_out, want_lse = shared_prefix_attention_op(*x, *ints, scale, "torch")
    assert_close(out, want_out, what="out")
    assert_close(lse, want_lse, what="lse")


# The torch backend's two forms (fused on CPU, masked elsewhere), and Triton.
FORMS = ["torch-fused", "torch-masked"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("form", FORMS)
def test_backward_is_deterministic(monkeypatch, seed: int, form: str) -> None:
    """Bitwise equal gradients on a rerun; the prefix ones sum over several rows per group
    (group 2 has three, not consecutive)."""
    backend = form.split("-")[0]
    if form == "torch-masked":
        monkeypatch.setattr(attention_module, "_fused", lambda device: False)
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
    leaves = _leaves(inp, torch.float32)
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
    leaves = list(_leaves(inp, torch.float32).values())
    got = torch.autograd.grad(fn(*leaves, *ints), leaves)
    ref_leaves = list(_leaves(inp, torch.float64).values())
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


_COMPILE_FOR_HOPPER = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import opsd_kernels.ops.attention as A

FP32_BUFFERS = {"OP", "LSEP", "LSE", "DELTA"}
TENSORS = {"Q", "K", "V", "PK", "PV", "OUT", "DO", "DQ", "DK", "DV", "DPK", "DPV"}
KERNELS = [A._fwd_prefix_kernel, A._fwd_suffix_kernel, A._bwd_dq_kernel,
           A._bwd_suffix_dkdv_kernel, A._bwd_prefix_dkdv_kernel]
for dtype, tname, d in ((torch.bfloat16, "bf16", 128), (torch.float32, "fp32", 48)):
    cfg = A._config(d, dtype, torch.device("cuda"))
    for kernel in KERNELS:
        bm, bn = cfg["fwd" if "fwd" in kernel.__name__ else "bwd"]
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["block_d"], PRECISION=cfg["precision"])
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*i64"
            elif name in FP32_BUFFERS:
                sig[name] = "*fp32"
            elif name in TENSORS:
                sig[name] = "*" + tname
            else:
                sig[name] = "fp32" if "scale" in name else "i32"
        compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg["warps"], num_stages=cfg["stages"]))
        assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, compiled.metadata.shared)
        print(tname, kernel.__name__, compiled.metadata.shared)
print("OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not usable here")
def test_kernels_compile_for_hopper(tmp_path: Path) -> None:
    """The interpreter accepts code that a GPU build rejects: lower every kernel to sm_90 code
    (no GPU needed) with the launch configurations of bf16 D = 128 and fp32 D = 48 (masked head
    dim, IEEE fp32 dots), within the H100's shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        proc.stdout[-4000:] + proc.stderr[-4000:])
