"""The divergence ops' driver (`opsd_kernels.divergence_driver`): a workspace that does not
grow with the tokens, results that do not depend on the chunking, bf16 logits handed to the
native step as they are, and no host conversions in a forward or backward."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_NATIVE, NATIVE_MISSING

import opsd_kernels
from opsd_kernels import divergence, divergence_driver, fused_linear_divergence

N, H, V = 5, 8, 37
FUNCTIONS = ["fused_linear_divergence", "divergence"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).requires_grad_(grad)


# --- workspace: O(chunk x V), independent of the number of tokens -------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_chunk_rows_does_not_grow_with_the_tokens(device: str) -> None:
    dev, vocab = torch.device(device), 151_936
    caps = {}
    for backend in ("torch", "triton", "native"):
        cap = divergence_driver.chunk_rows(10**6, vocab, backend, None, dev)
        assert 1 <= cap < 10**6
        for n in (10**7, 10**9, 2**40):
            assert divergence_driver.chunk_rows(n, vocab, backend, None, dev) == cap
        # never more rows than exist; the caller's chunk size wins
        assert divergence_driver.chunk_rows(3, vocab, backend, None, dev) == 3
        for n in (7, 100, 10**9):
            assert divergence_driver.chunk_rows(n, vocab, backend, 7, dev) == 7
        assert divergence_driver.chunk_rows(3, vocab, backend, 7, dev) == 3
        # a wider vocabulary never gets more rows
        assert divergence_driver.chunk_rows(10**6, 4 * vocab, backend, None, dev) < cap
        caps[backend] = cap
    # The PyTorch step keeps [rows, V] temporaries the kernels do not: it gets fewer rows.
    assert caps["torch"] < caps["triton"] and caps["torch"] < caps["native"]


@pytest.fixture
def row_blocks(monkeypatch) -> list[tuple[int, torch.dtype, torch.dtype]]:
    """(rows, student dtype, teacher dtype) of every block a row step is given."""
    seen: list[tuple[int, torch.dtype, torch.dtype]] = []
    real = divergence_driver.row_step_for

    def spy(backend):
        step = real(backend)

        def recording_step(s, t, *args):
            seen.append((s.shape[0], s.dtype, t.dtype))
            return step(s, t, *args)

        return recording_step

    monkeypatch.setattr(divergence_driver, "row_step_for", spy)
    return seen


@pytest.mark.parametrize("n", [37, 211])
def test_default_workspace_bounds_the_block(n: int, monkeypatch, row_blocks) -> None:
    vocab = 53
    per_row = 4 * vocab * (2 + divergence_driver.extra_row_buffers("torch", torch.device("cpu")))
    monkeypatch.setitem(divergence_driver.DEFAULT_WORKSPACE_BYTES, "cpu", 5 * per_row)
    h_s = _randn(n, H, seed=31, grad=True)
    w = _randn(vocab, H, seed=32, grad=True)
    fused_linear_divergence(h_s, w, _randn(n, H, seed=33), backend="torch").backward()
    divergence(_randn(n, vocab, seed=34, grad=True), _randn(n, vocab, seed=35),
               backend="torch").backward()
    rows = [r for r, _, _ in row_blocks]
    assert max(rows) == 5
    assert sum(rows) == 2 * n


def _all_outputs(fn_name: str, n: int, chunk_size: int | None, reduction: str) -> list:
    g = _gen(40)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -100
    common = dict(labels=labels, reduction=reduction, backend="torch", chunk_size=chunk_size,
                  return_stats=True, beta=0.3, token_weights=torch.rand(n, generator=g))
    if fn_name == "fused_linear_divergence":
        inputs = [torch.randn(n, H, generator=g).requires_grad_(),
                  torch.randn(V, H, generator=g).requires_grad_(),
                  torch.randn(n, H, generator=g)]
        bias = torch.randn(V, generator=g).requires_grad_()
        loss, stats = fused_linear_divergence(*inputs, student_bias=bias, **common)
        params = [inputs[0], inputs[1], bias]
    else:
        params = [torch.randn(n, V, generator=g).requires_grad_()]
        loss, stats = divergence(params[0], torch.randn(n, V, generator=g), **common)
    loss.sum().backward()
    return [loss.detach(), *stats, *(p.grad for p in params)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_result_does_not_depend_on_chunk_size(fn_name: str, reduction: str, row_blocks) -> None:
    n = 23
    want = _all_outputs(fn_name, n, None, reduction)
    for chunk_size in (1, 7, n, 10 * n):
        row_blocks.clear()
        got = _all_outputs(fn_name, n, chunk_size, reduction)
        assert max(r for r, _, _ in row_blocks) == min(chunk_size, n)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


# --- bf16 logits and the native step ------------------------------------------------------------


def _bf16_logits_run(top_k: int | None, need_grad: bool) -> list[torch.Tensor]:
    g = _gen(50)
    s = (torch.randn(9, 301, generator=g) * 3).bfloat16().requires_grad_(need_grad)
    t = (torch.randn(9, 301, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 301, (9,), generator=g)
    labels[4] = -100
    loss, stats = divergence(s, t, labels=labels, backend="native", chunk_size=4, top_k=top_k,
                             divergence="jsd", beta=0.3, return_stats=True)
    out = [loss.detach(), *stats]
    if need_grad:
        loss.backward()
        out.append(s.grad)
    return out


@pytest.mark.skipif(not HAS_NATIVE, reason=f"native: {NATIVE_MISSING}")
@pytest.mark.parametrize("need_grad", [True, False])
def test_native_reads_bf16_logits_without_an_fp32_copy(need_grad: bool, monkeypatch,
                                                       row_blocks) -> None:
    """The native step gets bf16 rows of both roles (and writes the bf16 gradient over its own
    copy of the student's), with the results of the fp32-copy path to the last bit."""
    got = _bf16_logits_run(None, need_grad)
    assert {(dt_s, dt_t) for _, dt_s, dt_t in row_blocks} == {(torch.bfloat16, torch.bfloat16)}
    monkeypatch.setattr(divergence_driver, "_native_reads_bf16", lambda *args: False)
    row_blocks.clear()
    want = _bf16_logits_run(None, need_grad)
    assert {(dt_s, dt_t) for _, dt_s, dt_t in row_blocks} == {(torch.float32, torch.float32)}
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.skipif(not HAS_NATIVE, reason=f"native: {NATIVE_MISSING}")
def test_top_k_rows_stay_fp32_for_the_native_step(row_blocks) -> None:
    _bf16_logits_run(5, True)
    assert {(dt_s, dt_t) for _, dt_s, dt_t in row_blocks} == {(torch.float32, torch.float32)}


# --- no host synchronisation ----------------------------------------------------------------------


@pytest.fixture
def no_host_sync(monkeypatch):
    """Tensor -> Python conversions raise while the fixture is active."""

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called on the loss path")
        return raiser

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    # The label range check reads a bool on CPU only (on device it uses _assert_async).
    monkeypatch.setattr(opsd_kernels.losses.v, "check_labels", lambda *args: None)


@pytest.mark.parametrize("reduction", ["mean", "sequence_mean", "none"])
def test_forward_and_backward_make_no_host_conversions(reduction: str, no_host_sync) -> None:
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(()))  # the fixture is armed
    b, t = 2, 3
    h_s, w = _randn(b, t, H, seed=21, grad=True), _randn(V, H, seed=22, grad=True)
    h_t, w_t = _randn(b, t, H + 2, seed=23), _randn(V, H + 2, seed=24)
    bias = _randn(V, seed=26, grad=True)
    labels = torch.tensor([[3, -100, 5], [0, 36, 2]])
    weights = torch.rand(b, t, generator=_gen(25)) + 0.5
    for options in (dict(), dict(top_k=4, tail_bucket=True, divergence="forward_kl"),
                    dict(divergence="sampled")):
        loss = fused_linear_divergence(h_s, w, h_t, w_t, labels=labels, reduction=reduction,
                                       token_weights=weights, student_bias=bias,
                                       backend="torch", **options)
        loss.sum().backward()
        s = _randn(2, 3, V, seed=41, grad=True)
        divergence(s, _randn(2, 3, V, seed=42), labels=labels, reduction=reduction,
                   backend="torch", **options).sum().backward()
