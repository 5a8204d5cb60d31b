"""Parity with TRL's `GKDTrainer.generalized_jsd_loss`, the loss the OPSD reference code uses.

TRL's function is run in float64 on the same (upcast) inputs, with autograd for its gradient;
ours runs in fp32, from logits (`divergence`) and from hidden states
(`fused_linear_divergence`). TRL's "batchmean" with labels is the sum over unmasked tokens
divided by their count, i.e. our reduction="mean".
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    BACKENDS,
    DEVICE,
    HAS_TRITON,
    assert_close,
    generator,
    make_fused_inputs,
    make_logits_inputs,
)

from opsd_kernels import divergence, fused_linear_divergence

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd")
trl_jsd = gkd.GKDTrainer.generalized_jsd_loss

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [0.7, 1.1, 2.0]  # 1.1: the OPSD reference configuration


def _cases() -> list:
    cases = [pytest.param("torch", b, t, id=f"torch-beta{b}-tau{t}")
             for b in BETAS for t in TEMPERATURES]
    if HAS_TRITON:
        cases += [pytest.param("triton", b, 1.1, id=f"triton-beta{b}-tau1.1") for b in BETAS]
    return cases


def _shape(backend: str) -> tuple[int, int]:
    return (3, 9) if backend == "torch" else (2, 5)


@pytest.mark.parametrize("backend, beta, temperature", _cases())
def test_logits_match_trl(seed, backend, beta, temperature):
    inp = make_logits_inputs(seed, token_shape=_shape(backend), vocab=257)
    z_s64 = inp.student_logits.clone().requires_grad_()
    expected = trl_jsd(z_s64, inp.teacher_logits, labels=inp.labels, beta=beta,
                       temperature=temperature)
    expected.backward()

    z_s = inp.student_logits.float().requires_grad_()
    loss = divergence(z_s, inp.teacher_logits.float(), labels=inp.labels, divergence="jsd",
                      beta=beta, temperature=temperature, backend=backend)
    loss.backward()
    assert_close(loss, expected, what="loss")
    assert_close(z_s.grad, z_s64.grad, what="grad of student logits")


@pytest.mark.parametrize("backend, beta, temperature", _cases())
def test_fused_matches_trl(seed, backend, beta, temperature):
    """TRL on materialised logits h W^T (teacher detached) vs the fused loss: loss and the
    gradients of the student hidden states and the shared lm_head."""
    inp = make_fused_inputs(seed, token_shape=_shape(backend), hidden=16, vocab=257)
    h64 = inp.student_hidden.clone().requires_grad_()
    w64 = inp.weight.clone().requires_grad_()
    expected = trl_jsd(h64 @ w64.t(), inp.teacher_hidden @ w64.detach().t(), labels=inp.labels,
                       beta=beta, temperature=temperature)
    expected.backward()

    h = inp.student_hidden.float().requires_grad_()
    w = inp.weight.float().requires_grad_()
    loss = fused_linear_divergence(h, w, inp.teacher_hidden.float(), labels=inp.labels,
                                   divergence="jsd", beta=beta, temperature=temperature,
                                   backend=backend, chunk_size=4)
    loss.backward()
    assert_close(loss, expected, what="loss")
    assert_close(h.grad, h64.grad, what="grad of student_hidden")
    assert_close(w.grad, w64.grad, what="grad of weight")


@pytest.mark.parametrize("num_items", [50.0, "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_matches_trl(seed, backend, num_items):
    """TRL's num_items_in_batch (global token count for gradient accumulation) is our
    num_items."""
    if num_items == "tensor":
        num_items = torch.tensor(50.0, device=DEVICE)
    inp = make_logits_inputs(seed, token_shape=_shape(backend), vocab=129)
    z_s64 = inp.student_logits.clone().requires_grad_()
    expected = trl_jsd(z_s64, inp.teacher_logits, labels=inp.labels, beta=0.3, temperature=1.1,
                       num_items_in_batch=num_items)
    expected.backward()
    z_s = inp.student_logits.float().requires_grad_()
    loss = divergence(z_s, inp.teacher_logits.float(), labels=inp.labels, beta=0.3,
                      temperature=1.1, num_items=num_items, backend=backend)
    loss.backward()
    assert_close(loss, expected, what="loss")
    assert_close(z_s.grad, z_s64.grad, what="grad of student logits")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_without_labels_trl_divides_by_batch(seed, beta):
    """Without labels TRL's "batchmean" is sum / B (B = first dim), not a token mean: our
    reduction="sum" divided by B reproduces it."""
    inp = make_logits_inputs(seed, token_shape=(3, 7), vocab=65, labels=False)
    expected = trl_jsd(inp.student_logits, inp.teacher_logits, beta=beta, temperature=1.1)
    loss = divergence(inp.student_logits.float(), inp.teacher_logits.float(), beta=beta,
                      temperature=1.1, reduction="sum", backend="torch")
    assert_close(loss / 3, expected, what="loss")


def test_trl_in_fp32_agrees_with_float64(seed):
    """The comparison above is meaningful: TRL itself in fp32 agrees with its float64 value
    within the same tolerance (so a failure is ours, not a precision artefact)."""
    inp = make_logits_inputs(seed, token_shape=(3, 9), vocab=257)
    gen = generator(seed)
    beta = float(torch.rand((), generator=gen)) * 0.8 + 0.1
    expected = trl_jsd(inp.student_logits, inp.teacher_logits, labels=inp.labels, beta=beta,
                       temperature=1.1)
    fp32 = trl_jsd(inp.student_logits.float(), inp.teacher_logits.float(), labels=inp.labels,
                   beta=beta, temperature=1.1)
    assert_close(fp32, expected, what="TRL fp32")
