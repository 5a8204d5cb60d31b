"""What the public losses settle before any kernel runs: batches without tokens give a zero
loss on the graph and zero gradients of the inputs' shapes (every backend, every entry point);
a tensor in the teacher_weight slot that is not a head weight is named as a positional mistake;
OPSD_CHECK_FINITE=1 names the non-finite tensor."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS

from opsd_kernels import (
    FusedLinearDivergenceLoss,
    divergence,
    divergence_stats,
    fused_linear_divergence,
)

H, V = 8, 16
EMPTY_SHAPES = [(0,), (0, 5), (3, 0)]
REDUCTIONS = ["mean", "sum", "sequence_mean", "none"]


def _linear_inputs(token_shape, *, bias: bool = False, nonfinite: str | None = None):
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(*token_shape, H, generator=gen)
    w = torch.randn(V, H, generator=gen)
    h_t = torch.randn(*token_shape, H, generator=gen)
    b = torch.randn(V, generator=gen) if bias else None
    if nonfinite is not None:
        {"student_hidden": h_s, "weight": w, "teacher_hidden": h_t}[nonfinite].view(-1)[3] = (
            float("nan"))
    leaves = [t.requires_grad_() for t in (h_s, w, b) if t is not None]
    labels = torch.randint(0, V, token_shape, generator=gen)
    return h_s, w, h_t, b, labels, leaves


def _reductions_for(token_shape):
    return [r for r in REDUCTIONS if r != "sequence_mean" or len(token_shape) == 2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("token_shape", EMPTY_SHAPES, ids=str)
def test_fused_linear_divergence_on_no_tokens_gives_zero_grads(backend, token_shape) -> None:
    for reduction in _reductions_for(token_shape):
        h_s, w, h_t, b, labels, leaves = _linear_inputs(token_shape, bias=True)
        loss, stats = fused_linear_divergence(h_s, w, h_t, labels=labels, student_bias=b,
                                              reduction=reduction, backend=backend,
                                              return_stats=True)
        expected_shape = token_shape if reduction == "none" else ()
        assert loss.shape == expected_shape and loss.dtype == torch.float32, reduction
        assert loss.requires_grad and (reduction == "none" or loss.item() == 0.0)
        assert all(s.shape == token_shape for s in stats)
        loss.sum().backward()
        for leaf in leaves:
            assert leaf.grad is not None and leaf.grad.shape == leaf.shape, reduction
            assert leaf.grad.dtype == leaf.dtype and not leaf.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("token_shape", EMPTY_SHAPES, ids=str)
def test_divergence_on_no_tokens_gives_zero_grads(backend, token_shape) -> None:
    for reduction in _reductions_for(token_shape):
        s = torch.randn(*token_shape, V, requires_grad=True)
        t = torch.randn(*token_shape, V)
        loss = divergence(s, t, labels=torch.zeros(token_shape, dtype=torch.long),
                          reduction=reduction, backend=backend)
        loss.sum().backward()
        assert s.grad is not None and s.grad.shape == s.shape and not s.grad.any()


def test_module_and_stats_on_no_tokens() -> None:
    h_s, w, h_t, _, labels, leaves = _linear_inputs((0, 4))
    FusedLinearDivergenceLoss(beta=0.3)(h_s, w, h_t, labels=labels).backward()
    assert [leaf.grad.shape for leaf in leaves] == [leaf.shape for leaf in leaves]
    stats = divergence_stats(h_s, w, h_t, labels=labels)
    assert stats.divergence.shape == (0, 4)


def test_frozen_weight_gets_no_gradient_on_no_tokens() -> None:
    h_s = torch.randn(0, H, requires_grad=True)
    w = torch.randn(V, H)
    fused_linear_divergence(h_s, w, torch.randn(0, H)).backward()
    assert h_s.grad.shape == (0, H) and w.grad is None


@pytest.mark.parametrize("misplaced", ["labels", "token_weights", "beta"])
def test_a_positional_argument_in_the_teacher_weight_slot_is_named(misplaced) -> None:
    h_s, w, h_t, _, labels, _ = _linear_inputs((2, 3))
    value = {"labels": labels, "token_weights": torch.ones(2, 3), "beta": 0.5}[misplaced]
    with pytest.raises(ValueError, match=r"^teacher_weight: .*keyword-only \(labels=\.\.\."):
        fused_linear_divergence(h_s, w, h_t, value)
    with pytest.raises(ValueError, match=r"^teacher_weight: .*keyword-only"):
        FusedLinearDivergenceLoss()(h_s, w, h_t, value)


@pytest.mark.parametrize("where", ["student_hidden", "weight", "teacher_hidden"])
def test_the_opt_in_finite_check_names_the_tensor(where, monkeypatch) -> None:
    h_s, w, h_t, _, labels, _ = _linear_inputs((2, 3), nonfinite=where)
    # Off by default: PyTorch's semantics, NaN in, NaN out.
    assert torch.isnan(fused_linear_divergence(h_s, w, h_t, labels=labels, backend="torch"))
    monkeypatch.setenv("OPSD_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=rf"^{where}: contains NaN or Inf"):
        fused_linear_divergence(h_s, w, h_t, labels=labels, backend="torch")


def test_the_opt_in_finite_check_covers_logits_and_passes_finite_input(monkeypatch) -> None:
    monkeypatch.setenv("OPSD_CHECK_FINITE", "1")
    s, t = torch.randn(4, V, requires_grad=True), torch.randn(4, V)
    assert torch.isfinite(divergence(s, t, backend="torch"))
    t[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^teacher_logits: contains NaN or Inf"):
        divergence(s, t, backend="torch")
