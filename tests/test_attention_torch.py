"""The PyTorch backend of shared-prefix attention (`opsd_kernels.ops.attention_torch`): its
masked and fused forms, forward and analytic backward, in float64 against the oracle and
autograd, and through the op in every dtype. The baseline `sdpa_prefix_attention` is checked
against the oracle here too."""

from __future__ import annotations

import attention_cases as cases
import pytest
import torch
from conftest import LOW_PRECISION

from opsd_kernels.ops.attention_torch import (
    fused_prefix_attention,
    fused_prefix_attention_backward,
    prefix_attention_backward,
    prefix_attention_parts,
    runs_fused_form,
)
from opsd_kernels.reference.attention import naive_prefix_attention, sdpa_prefix_attention

# --- the oracles agree with each other --------------------------------------------------------


@pytest.mark.parametrize("case_name", list(cases.CASES))
def test_two_part_reference_and_sdpa_match_naive(seed: int, case_name: str) -> None:
    inp = cases.make_inputs(seed, cases.CASES[case_name], torch.float64)
    want = cases.oracle(inp)
    for form in (lambda *a: prefix_attention_parts(*a)[0], sdpa_prefix_attention,
                 lambda *a: prefix_attention_parts(*a, chunk_size=1)[0]):
        cases.compare(cases.run(form, inp, torch.float64), want, torch.float64)
    leaves = cases.leaves_of(inp, torch.float64)
    args = (*leaves.values(), inp.group_index, inp.prefix_lengths, inp.suffix_lengths)
    _, lse_naive = naive_prefix_attention(*args, return_lse=True)
    torch.testing.assert_close(prefix_attention_parts(*args)[1], lse_naive)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_analytic_backward_matches_autograd(seed: int, chunk_size: int | None) -> None:
    """`prefix_attention_backward` (the torch backend's backward off CPU) against autograd
    through the two-part form, for any chunking of the rows."""
    case = cases.CASES["gqa_ragged"]
    inp = cases.make_inputs(seed, case, torch.float64)
    want_out, want = cases.run(lambda *a: prefix_attention_parts(*a)[0], inp, torch.float64)
    x = [t.detach() for t in cases.leaves_of(inp, torch.float64).values()]
    ints = (inp.group_index, torch.tensor(case.prefix_lengths),
            torch.tensor(case.suffix_lengths))
    out, lse = prefix_attention_parts(*x, *ints, chunk_size=chunk_size)
    torch.testing.assert_close(out, want_out)
    got = prefix_attention_backward(inp.grad_out, *x, *ints, out, lse, case.d**-0.5,
                                    chunk_size=chunk_size)
    for name, a, b in zip(cases.NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("case_name", list(cases.CASES))
def test_fused_form_matches_autograd(seed: int, case_name: str) -> None:
    """`fused_prefix_attention` and its backward (the torch backend on CPU) in float64 against
    the oracle's output, lse and autograd gradients: groups whose rows are consecutive (a
    slice) and scattered (a gather), GQA / MQA, strided inputs, ragged lengths."""
    case = cases.CASES[case_name]
    inp = cases.make_inputs(seed, case, torch.float64)
    want_out, want = cases.oracle(inp)
    leaves = cases.leaves_of(inp, torch.float64)
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
    for name, a, w in zip(cases.NAMES, got, want, strict=True):
        assert a.is_contiguous(), f"grad of {name}: not contiguous"
        torch.testing.assert_close(a, w, msg=lambda m, n=name: f"grad of {n}: {m}")
    no_prefix = fused_prefix_attention_backward(inp.grad_out, *x, inp.group_index, pl, sl, out,
                                                lse, case.d**-0.5, prefix_grad=False)
    assert no_prefix[3] is None and no_prefix[4] is None
    for a, w in zip(no_prefix[:3], got[:3], strict=True):
        assert torch.equal(a, w)


@pytest.mark.parametrize("dtype", (torch.float32, *LOW_PRECISION), ids=str)
@pytest.mark.parametrize("case_name", list(cases.CASES))
def test_masked_form_through_the_op(monkeypatch, seed: int, case_name: str,
                                    dtype: torch.dtype) -> None:
    """The masked chunked form, which the torch backend runs off CPU, through the op on CPU
    against the float64 oracle (fp32 within tolerance, 16-bit by the flash-attention rule)."""
    cases.use_form(monkeypatch, "torch-masked")
    inp = cases.make_inputs(seed, cases.CASES[case_name], dtype)
    baseline = None if dtype == torch.float32 else cases.plain(inp)
    cases.compare(cases.ours(inp, "torch"), cases.oracle(inp), dtype, baseline=baseline)


def test_cpu_runs_the_fused_form() -> None:
    assert runs_fused_form(torch.device("cpu"))
    assert not runs_fused_form(torch.device("meta"))




def test_old_import_path_still_resolves() -> None:
    """The forms lived in opsd_kernels.reference.attention before; importing them from there
    still works, and gives the same objects."""
    from opsd_kernels.ops import attention_torch
    from opsd_kernels.reference import attention as reference

    for name in ("prefix_attention_parts", "prefix_attention_backward", "fused_prefix_attention",
                 "fused_prefix_attention_backward", "chunk_rows", "WORKSPACE_BYTES"):
        assert getattr(reference, name) is getattr(attention_torch, name), name
    with pytest.raises(AttributeError, match="no_such_name"):
        reference.no_such_name  # noqa: B018
