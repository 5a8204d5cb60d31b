"""`fused_linear_logprobs` against the float64 oracle: values and both gradients, odd shapes,
masks, chunkings, temperatures and every dtype; and its errors."""

from __future__ import annotations

import pytest
import torch

from opsd_kernels import fused_linear_logprobs

# Per dtype: (atol, rtol) of the log-probs and of the gradients, against float64 on the same
# (rounded) inputs.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2),
             torch.float16: (5e-3, 5e-3)}


def oracle(hidden, weight, labels, temperature=1.0, ignore_index=-100):
    logits = hidden.double() @ weight.double().t() / temperature
    kept = labels != ignore_index
    logp = torch.log_softmax(logits, dim=-1).gather(
        -1, torch.where(kept, labels, 0)[..., None]).squeeze(-1)
    return torch.where(kept, logp, 0.0)


def inputs(shape, hidden=24, vocab=53, dtype=torch.float32, seed=0, ignore=0.25, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, hidden, generator=g) * scale).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore] = -100
    return h, w, labels


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 1)], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients(dtype, shape, chunk_size, temperature):
    h, w, labels = inputs(shape, dtype=dtype, seed=len(shape) * 10 + shape[0])
    h.requires_grad_(), w.requires_grad_()
    out = fused_linear_logprobs(h, w, labels, temperature=temperature, chunk_size=chunk_size)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = oracle(h64, w64, labels, temperature)
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == torch.float32 and out.shape == shape
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    assert torch.all(out[labels == -100] == 0)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    (expected * g.double()).sum().backward()
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    h, w, labels = inputs((6,))
    h.requires_grad_()
    fused_linear_logprobs(h, w, labels).sum().backward()
    assert w.grad is None and h.grad is not None and torch.isfinite(h.grad).all()


def test_extreme_logits_stay_finite():
    # logits of ~1e4: a naive exp overflows; the log-sum-exp form does not
    h, w, labels = inputs((9,), scale=3e3, ignore=0.0)
    h.requires_grad_(), w.requires_grad_()
    out = fused_linear_logprobs(h, w, labels)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(h.grad).all()
    assert torch.isfinite(w.grad).all() and (out <= 0).all()


def test_every_label_ignored_gives_zeros_and_zero_gradients():
    h, w, labels = inputs((4,), ignore=1.0)
    h.requires_grad_(), w.requires_grad_()
    out = fused_linear_logprobs(h, w, labels)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_empty_batch():
    h, w, _ = inputs((0,))
    h.requires_grad_()
    out = fused_linear_logprobs(h, w, torch.zeros(0, dtype=torch.int64))
    out.sum().backward()
    assert out.shape == (0,) and h.grad.shape == h.shape


@pytest.mark.parametrize("case, message", [
    (dict(labels=torch.zeros(5)), "labels: expected an integer tensor"),
    (dict(labels=torch.zeros(4, dtype=torch.int64)), "labels: expected shape"),
    (dict(labels=torch.full((5,), 53)), "labels: values must be in"),
    (dict(weight=torch.zeros(53, 7)), "weight: shape"),
    (dict(weight=torch.zeros(53, 24, dtype=torch.bfloat16)), "hidden: dtype"),
    (dict(temperature=0.0), "temperature: must be"),
    (dict(chunk_size=0), "chunk_size: must be"),
])
def test_errors_name_the_argument(case, message):
    h, w, labels = inputs((5,), ignore=0.0)
    args = {"hidden": h, "weight": w, "labels": labels} | case
    keywords = {k: args.pop(k) for k in ("temperature", "chunk_size") if k in args}
    with pytest.raises(ValueError, match=message):
        fused_linear_logprobs(args["hidden"], args["weight"], args["labels"], **keywords)
