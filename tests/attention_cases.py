"""Inputs and comparisons shared by the shared-prefix attention tests (test_attention*.py).

Every test draws fresh random inputs (a seed per test), rounds them to the test dtype once, and
checks the output and all five gradients against the float64 oracle `naive_prefix_attention`:
fp32 within `TOL`, bf16 / fp16 by the flash-attention rule against plain PyTorch in that dtype.
The Triton kernels run under the interpreter on CPU, so sizes stay tiny: odd lengths (R = 7,
P = 5), D not a power of two, GQA and MQA, ragged prefix and suffix lengths, groups of 1 and 3
rows and a group without rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from conftest import DEVICE, HAS_TRITON, assert_close, assert_fa_rule, generator, randn

from opsd_kernels.attention import shared_prefix_attention
from opsd_kernels.reference.attention import naive_prefix_attention

# The attention op has a PyTorch and a Triton backend (no native kernel).
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
NAMES = ("query", "key", "value", "prefix_key", "prefix_value")


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


def leaves_of(inp: Inputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
    leaves = leaves_of(inp, dtype)
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


def compare(got, want, dtype, baseline=None) -> None:
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


# The torch backend's two forms (fused on CPU, masked elsewhere), and Triton.
FORMS = ["torch-fused", "torch-masked"] + (["triton"] if HAS_TRITON else [])


def use_form(monkeypatch, form: str) -> str:
    """Make the op run `form` on this device; returns the backend to ask for."""
    from opsd_kernels.ops import attention_torch

    if form.startswith("torch-"):
        fused = form == "torch-fused"
        monkeypatch.setattr(attention_torch, "runs_fused_form", lambda device: fused)
    return form.split("-")[0]
