"""The Triton launchers of shared-prefix attention (`opsd_kernels.ops.attention`) alone: every
output element written, every kernel lowered for sm_90, and what only a GPU build would
reject or get wrong (32-bit offsets, grid limits). Their numerics through the op:
test_attention.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_cases import CASES, NAMES, make_inputs
from conftest import DEVICE, HAS_TRITON, assert_close, requires_triton

from opsd_kernels.attention import shared_prefix_attention, shared_prefix_attention_op

REPO_ROOT = Path(__file__).resolve().parents[1]
# The interpreter evaluates exp2 on lanes that tl.where then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


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


def _inside_nan(x: torch.Tensor) -> torch.Tensor:
    """x, contiguous, in the middle of a NaN-filled buffer three times its size: a read past
    either end of it finds NaN."""
    buffer = torch.full((3 * x.numel(),), math.nan, dtype=x.dtype, device=x.device)
    return buffer[x.numel():2 * x.numel()].view(x.shape).copy_(x)


def _launch_both(x: list[torch.Tensor], grad_out: torch.Tensor, ints: tuple, scale: float
                 ) -> list[torch.Tensor]:
    from opsd_kernels.ops.attention import (
        shared_prefix_attention_bwd_triton_,
        shared_prefix_attention_fwd_triton_,
    )

    out, lse = torch.empty_like(x[0]), torch.empty(x[0].shape[:3], device=x[0].device)
    shared_prefix_attention_fwd_triton_(*x, *ints, scale, out, lse)
    grads = [torch.empty_like(t) for t in x]
    shared_prefix_attention_bwd_triton_(grad_out, *x, *ints, out, lse, scale, *grads)
    return [out, lse, *grads]


@requires_triton
def test_lengths_past_the_tensors_read_nothing_past_them(seed: int) -> None:
    """Lengths beyond R or P are refused on the host, but not while torch.compile traces;
    the kernels then read them as R and P and never past their tensors (a read past the end
    could fault on a GPU): with every tensor inside NaN, the results are those of the clamped
    lengths, bitwise."""
    case = CASES["gqa_ragged"]  # R = 7, P = 5, groups (2, 0, 2, 2), group 1 without rows
    inp = make_inputs(seed, case)
    x = [_inside_nan(t.float()) for t in inp.tensors.values()]
    grad_out = _inside_nan(inp.grad_out.float())
    long = (inp.group_index, torch.tensor([case.p + 3, 2, case.p + 1]),
            torch.tensor([case.r + 2, 1, 4, case.r + 9]))
    clamped = (inp.group_index, long[1].clamp(max=case.p), long[2].clamp(max=case.r))
    want = _launch_both(x, grad_out, clamped, case.d**-0.5)
    got = _launch_both(x, grad_out, long, case.d**-0.5)
    for name, a, b in zip(("out", "lse", *NAMES), got, want, strict=True):
        assert not b.isnan().any(), name
        assert torch.equal(a, b), name


@requires_triton
def test_grids_beyond_cuda_limits_are_refused() -> None:
    """Rows and groups sit on a grid dimension CUDA caps at 65535 (the interpreter has no
    cap): more is a clear error before any launch, not a failed launch on the GPU."""
    from opsd_kernels.ops.attention import MAX_GRID_ROWS

    n = MAX_GRID_ROWS + 1
    small = torch.randn(1, 1, 1, 16)
    rows = torch.randn(n, 1, 1, 16)
    with pytest.raises(ValueError, match=rf"^query: {n} suffix rows exceed"):
        shared_prefix_attention(rows, rows, rows, small, small, torch.zeros(n, dtype=torch.long),
                                backend="triton")
    with pytest.raises(ValueError, match=rf"^prefix_key: {n} groups exceed"):
        shared_prefix_attention(small, small, small, rows, rows, torch.zeros(1, dtype=torch.long),
                                backend="triton")


# Every tensor of the op as a view whose position (or head-dim) stride is an int32 value but
# whose offsets reach past 2^31: a 32-bit product wraps to a negative offset, which the
# interpreter reads as the GPU would (a crash, or another tensor's data). The buffers are
# allocated but never touched beyond the viewed elements (pages are committed on first touch),
# so each costs a few pages of memory, not its 4 GB of address space. A subprocess: a wrapped
# offset may crash the interpreter.
_WIDE_OFFSETS = r"""
import sys, torch
from opsd_kernels.attention import shared_prefix_attention

STRIDE = 2**30 + 64  # int32; twice it is not
dim = int(sys.argv[1])  # the dim whose stride is STRIDE: 2 positions, 3 head dim


def spread(x):
    strides = [1, 1, 1, 1]
    strides[dim] = STRIDE
    span = 1 + sum((n - 1) * s for n, s in zip(x.shape, strides))
    view = torch.empty(span, dtype=x.dtype).as_strided(x.shape, strides)
    return view.copy_(x)


g = torch.Generator().manual_seed(0)
# B = H = 1 (their strides never matter), three positions and a head dim of 3 (two steps of
# STRIDE along the spread dim reach 2^31 + 128).
xs = [torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float32) for _ in range(5)]
ints = torch.zeros(1, dtype=torch.int64), torch.tensor([3]), torch.tensor([3])
results = []
for inputs in (xs, [spread(x) for x in xs]):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = shared_prefix_attention(*leaves, *ints, backend="triton")
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    results.append((out, *grads))
for want, got in zip(*results):
    assert torch.equal(got, want), (got, want)
print("OK")
"""


@requires_triton
@pytest.mark.parametrize("dim", [2, 3], ids=["positions", "head_dim"])
def test_offsets_past_2_31_do_not_wrap(dim: int) -> None:
    """Offsets that reach past 2^31 elements (strides below 2^31) give the results of the same
    values laid out contiguously, forward and backward."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _WIDE_OFFSETS, str(dim)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"exit code {proc.returncode}\n" + proc.stdout[-4000:] + proc.stderr[-4000:])
