"""The CUDA row kernel (csrc/cuda/divergence.cu) on a GPU, against the float64 oracle.

Runs only with a CUDA device and an extension built with CUDA kernels (opsd_kernels._C with
has_cuda); skipped with the reason otherwise. The fp32 row-step suite of test_divergence.py
already covers this kernel as its "native" step on CUDA tensors; this file adds what only the
CUDA port has: bf16 rows (gradient over them in bf16; a separate gradient buffer, which only
the kernel-level launcher takes, is covered by the host harness in test_cuda_compile.py),
vocabularies on both sides of the warp-per-row / block-per-row switch and a real one
(V = 128256), row starts off the 16-byte grid, poisoned outputs, masked rows full of garbage,
launches on a side stream, and agreement with the Triton kernel.
"""

from __future__ import annotations

import math

import pytest
import test_divergence as td
import torch
from conftest import HAS_TRITON, assert_close, generator, randn

from opsd_kernels._native import device_error
from opsd_kernels.divergence_options import RowOptions
from opsd_kernels.types import NUM_STATS

CUDA = torch.device("cuda")
_WHY = "needs a CUDA device" if not torch.cuda.is_available() else device_error(CUDA)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY is not None, reason=f"{_WHY}")]

IGNORE = td.IGNORE
KIND_CASES = [("jsd", 0.5), ("jsd", 0.1), ("forward_kl", 0.5), ("reverse_kl", 0.5),
              ("sampled", 0.5)]
KIND_IDS = ["jsd0.5", "jsd0.1", "forward_kl", "reverse_kl", "sampled"]
OPTION_SETS = {
    "plain": dict(),
    "temperatures": dict(tau_s=0.7, tau_t=1.3),
    "clip": dict(clip=0.05),
    "softcap": dict(softcap=3.0, tau_s=1.1, tau_t=1.1),
}
# Both sides of the warp / block switch (V <= 4096: a warp per row), odd sizes, a real vocab.
VOCABS = [1, 7, 1013, 4096, 4097, 20011]


def _opts(kind: str, beta: float, **kw) -> RowOptions:
    return td._opts(kind, beta, **kw)


def cuda_step(s, t, labels, coef, stats, opts: RowOptions, write_grad: bool) -> None:
    from opsd_kernels.ops.divergence_native import divergence_rows_native_

    divergence_rows_native_(s, t, labels, coef, stats, opts, write_grad)


def _block(seed: int, rows: int, vocab: int, dtype=torch.float32, *, std: float = 2.0):
    """Student / teacher logits (rounded to dtype), labels with masked rows, coef, on CUDA."""
    gen = generator(seed)
    s = randn(gen, rows, vocab, scale=std)
    t = s + randn(gen, rows, vocab, scale=std / 2)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[-1] = vocab - 1
    labels[torch.arange(rows) % 4 == 1] = IGNORE
    coef = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    return (s.to(dtype).to(CUDA), t.to(dtype).to(CUDA), labels.to(CUDA),
            coef.float().to(CUDA))


def _poisoned_stats(rows: int) -> torch.Tensor:
    return torch.full((rows, NUM_STATS), math.nan, device=CUDA)


def _check_bf16_grad(grad: torch.Tensor, exp_grad: torch.Tensor, labels) -> None:
    """A gradient rounded to bf16: within half an ulp of the oracle plus the fp32 error."""
    assert torch.isfinite(grad).all()
    scale = max(exp_grad.abs().max().item(), 1e-3)
    torch.testing.assert_close(grad.double(), exp_grad, rtol=2.0**-8, atol=2e-5 * scale)
    assert (grad[labels == IGNORE] == 0).all()


def _check_stats(stats, exp_stats) -> None:
    assert not stats.isnan().any(), "stats: some elements were not written"
    for i in range(NUM_STATS):
        assert_close(stats[:, i], exp_stats[:, i], scale=max(exp_stats[:, i].abs().max(), 1.0),
                     what=f"stat {i}")


# --- fp32 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTION_SETS))
@pytest.mark.parametrize("kind, beta", KIND_CASES, ids=KIND_IDS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_fp32_matches_oracle(seed, vocab, kind, beta, opt_name):
    if kind == "sampled" and opt_name == "clip":
        pytest.skip("clipping is not defined for the sampled-token loss")
    opts = _opts(kind, beta, **OPTION_SETS[opt_name])
    s, t, labels, coef = _block(seed, 37, vocab, std=5.0 if opt_name == "clip" else 2.0)
    s_out, stats = s.clone(), _poisoned_stats(37)
    cuda_step(s_out, t, labels, coef, stats, opts, True)
    td._check(stats, s_out, *td._expected(s, t, labels, coef, opts, kind), labels)


def test_real_vocabulary(seed):
    """V = 128256 (Llama 3), the row maxima in different places: one 256-thread block per row
    with ~125 packs per lane per pass."""
    vocab = 128256
    opts = _opts("jsd", 0.5, tau_s=1.1, tau_t=1.1, clip=0.05)
    s, t, labels, coef = _block(seed, 6, vocab, std=3.0)
    for r in range(6):
        s[r, (r * 30011) % vocab] += 9.0
        t[r, (r * 70001 + 3) % vocab] += 9.0
    s_out, stats = s.clone(), _poisoned_stats(6)
    cuda_step(s_out, t, labels, coef, stats, opts, True)
    td._check(stats, s_out, *td._expected(s, t, labels, coef, opts, "jsd"), labels)


@pytest.mark.parametrize("layout", ["offset", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [37, 4099, 8195])
def test_rows_off_the_vector_grid(seed, vocab, dtype, layout):
    """Views whose rows do not start on a 16-byte boundary (base offset by one element, or a
    row stride of V + 3): the scalar head and tail cover what the packs do not; nothing
    outside the view is written."""
    opts = _opts("reverse_kl", 0.5, tau_s=0.9, tau_t=1.2)
    s, t, labels, coef = _block(seed, 9, vocab, dtype)

    def placed(x):
        if layout == "offset":
            buf = torch.full((x.numel() + 8,), 77.0, dtype=x.dtype, device=CUDA)
            view = buf[1:1 + x.numel()].view_as(x)
        else:
            buf = torch.full((x.shape[0], vocab + 3), 77.0, dtype=x.dtype, device=CUDA)
            view = buf[:, :vocab]
        view.copy_(x)
        return view, buf

    (s_view, s_buf), (t_view, t_buf) = placed(s), placed(t)
    stats = _poisoned_stats(9)
    cuda_step(s_view, t_view, labels, coef, stats, opts, True)
    assert torch.equal(t_view, t)
    exp_stats, exp_grad = td._expected(s.float(), t.float(), labels, coef, opts, "reverse_kl")
    if dtype == torch.float32:
        td._check(stats, s_view, exp_stats, exp_grad, labels)
    else:
        _check_stats(stats, exp_stats)
        _check_bf16_grad(s_view, exp_grad, labels)
    for buf, view in ((s_buf, s_view), (t_buf, t_view)):
        mask = torch.ones_like(buf, dtype=torch.bool)
        mask.view(-1)[view.storage_offset() + torch.arange(view.shape[0], device=CUDA)
                      .unsqueeze(1) * view.stride(0) + torch.arange(vocab, device=CUDA)] = False
        assert (buf[mask] == 77.0).all(), "wrote outside the view"


# --- bf16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, beta", KIND_CASES, ids=KIND_IDS)
@pytest.mark.parametrize("vocab", [1013, 20011])
def test_bf16_in_place(seed, vocab, kind, beta):
    """bf16 logits (8 per 16-byte pack), fp32 math, the gradient rounded to bf16 over s.
    Forward values must meet the fp32 tolerance (the logits are exact in fp32)."""
    opts = _opts(kind, beta, tau_s=1.1, tau_t=0.9)
    s, t, labels, coef = _block(seed, 21, vocab, torch.bfloat16)
    s_out, stats = s.clone(), _poisoned_stats(21)
    cuda_step(s_out, t, labels, coef, stats, opts, True)
    exp_stats, exp_grad = td._expected(s.float(), t.float(), labels, coef, opts, kind)
    _check_stats(stats, exp_stats)
    _check_bf16_grad(s_out, exp_grad, labels)


def test_mixed_dtypes(seed):
    """bf16 student with an fp32 teacher (the wrapper runs an fp32 copy of the bf16 role)."""
    opts = _opts("jsd", 0.5)
    s, _, labels, coef = _block(seed, 7, 3001, torch.bfloat16)
    _, t, _, _ = _block(seed + 1, 7, 3001, torch.float32)
    s_out, stats = s.clone(), _poisoned_stats(7)
    cuda_step(s_out, t, labels, coef, stats, opts, True)
    exp_stats, exp_grad = td._expected(s.float(), t, labels, coef, opts, "jsd")
    _check_stats(stats, exp_stats)
    _check_bf16_grad(s_out, exp_grad, labels)


# --- contract details ---------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("vocab", [64, 9000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_rows_hold_garbage(seed, dtype, vocab, garbage):
    opts = _opts("jsd", 0.5)
    s, t, labels, coef = _block(seed, 8, vocab, dtype)
    masked = labels == IGNORE
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[masked] = garbage
    t_bad[masked] = garbage
    stats = _poisoned_stats(8)
    cuda_step(s_bad, t_bad, labels, coef, stats, opts, True)
    assert (stats[masked] == 0).all() and (s_bad[masked] == 0).all()
    assert torch.isfinite(stats).all() and torch.isfinite(s_bad).all()


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "sampled"])
def test_without_grad_reads_only(seed, kind):
    opts = _opts(kind, 0.5, tau_s=0.8, tau_t=1.3)
    s, t, labels, coef = _block(seed, 11, 6007)
    s_in, stats = s.clone(), _poisoned_stats(11)
    cuda_step(s_in, t, labels, coef, stats, opts, False)
    assert torch.equal(s_in, s)
    exp_stats, _ = td._expected(s, t, labels, coef, opts, kind)
    _check_stats(stats, exp_stats)


def test_many_rows_and_side_stream(seed):
    """70001 rows of a small vocabulary (8 rows per block: the last block partly empty), launched
    on a side stream: the kernel runs on the current stream."""
    opts = _opts("forward_kl", 0.5, clip=0.05)
    s, t, labels, coef = _block(seed, 70001, 33)
    s_out, stats = s.clone(), _poisoned_stats(70001)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_step(s_out, t, labels, coef, stats, opts, True)
    torch.cuda.current_stream().wait_stream(side)
    td._check(stats, s_out, *td._expected(s, t, labels, coef, opts, "forward_kl"), labels)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not usable here")
@pytest.mark.parametrize("kind, beta", KIND_CASES, ids=KIND_IDS)
def test_agrees_with_triton(seed, kind, beta):
    """The two GPU kernels agree to fp32 rounding on a real-size block."""
    from opsd_kernels.ops.divergence import divergence_rows_triton_

    opts = _opts(kind, beta, clip=0.05 if kind == "jsd" else None)
    s, t, labels, coef = _block(seed, 64, 32000)
    out = []
    for step in (cuda_step, divergence_rows_triton_):
        s_out, stats = s.clone(), _poisoned_stats(64)
        step(s_out, t, labels, coef, stats, opts, True)
        out.append((stats, s_out))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-3,
                               atol=1e-5 * out[1][1].abs().max().item())
