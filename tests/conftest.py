"""Shared helpers of the numerical tests: inputs, the float64 oracle, tolerances, backends.

Every loss is checked against `opsd_kernels.reference` run in float64 on the *same* inputs
(upcast), on fresh random data (a seed per test, from its node id; OPSD_TEST_SEED mixes in
another). fp32 results must match within `TOL`; bf16 / fp16 results follow the
flash-attention rule: our error vs the float64 oracle is at most 2x (forward) / 3x (backward)
the error of plain PyTorch in the same dtype, plus a small floor (`assert_fa_rule`).

"Plain PyTorch in the same dtype" is what a TRL / Hugging Face training step does: the lm_head
GEMM in the input dtype (its output rounded to that dtype), the logits upcast to fp32 for the
softmax, autograd for the gradients (which land in the input dtype).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Before anything imports Triton (and before opsd_kernels decorates its kernels): on a machine
# without CUDA the Triton kernels run under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opsd_kernels import divergence, fused_linear_divergence  # noqa: E402
from opsd_kernels._native import device_error  # noqa: E402
from opsd_kernels.reference.divergence import reference_reduce, reference_stats  # noqa: E402
from opsd_kernels.types import STAT_NAMES  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
gpu = pytest.mark.gpu  # registered in pyproject.toml; use together with `requires_gpu`


def _triton_usable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return ON_GPU or os.environ.get("TRITON_INTERPRET", "0") == "1"


HAS_TRITON = _triton_usable()
# The native extension on this device (None when usable, else why not: tests skip with it).
NATIVE_MISSING = device_error(DEVICE)
HAS_NATIVE = NATIVE_MISSING is None
# Every backend that runs here goes through the same loss-level sweep.
BACKENDS: list[str] = (["torch"] + (["triton"] if HAS_TRITON else [])
                       + (["native"] if HAS_NATIVE else []))
backends = BACKENDS
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not usable here")

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Tol:
    atol: float  # relative to the largest magnitude of the expected tensor (see assert_close)
    rtol: float


# fp32 vs the float64 oracle; the low-precision rows are a coarse sanity bound only, the real
# low-precision check is the flash-attention rule.
TOL: dict[torch.dtype, Tol] = {
    torch.float32: Tol(atol=2e-5, rtol=2e-4),
    torch.bfloat16: Tol(atol=3e-2, rtol=5e-2),
    torch.float16: Tol(atol=5e-3, rtol=1e-2),
}

# Flash-attention rule factors and the absolute floor (relative to the largest expected value).
FA_FORWARD, FA_BACKWARD, FA_FLOOR = 2.0, 3.0, 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 *, scale: float | None = None, what: str = "") -> None:
    """|actual - expected| <= atol * scale + rtol * |expected| elementwise, NaN-free.

    `scale` defaults to max |expected| (at least 1e-2): errors are judged against the size of
    the tensor, so a tiny element of a large gradient is not held to a relative bound.
    """
    tol = TOL[dtype]
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    if scale is None:
        scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-2)
    torch.testing.assert_close(actual, expected, atol=tol.atol * scale, rtol=tol.rtol,
                               msg=lambda m: f"{what}: {m}")


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_fa_rule(ours: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, *,
                   backward: bool, what: str = "") -> None:
    """Flash-attention rule: err(ours) <= factor * err(plain PyTorch, same dtype) + floor."""
    factor = FA_BACKWARD if backward else FA_FORWARD
    assert torch.isfinite(ours.detach()).all(), f"{what}: non-finite values"
    err, base = max_err(ours, ref), max_err(baseline, ref)
    floor = FA_FLOOR * max(ref.detach().abs().max().item() if ref.numel() else 0.0, 1e-3)
    assert err <= factor * base + floor, (
        f"{what}: error {err:.3e} vs float64 exceeds {factor} x plain PyTorch's {base:.3e} "
        f"+ floor {floor:.1e}")


# --- the background lowering sweep of test_triton_lowering.py ---------------------------------

HAS_TRITON_PACKAGE = importlib.util.find_spec("triton") is not None
_LOWERING: dict[str, object] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start lowering every Triton kernel for the GPU as soon as a test that reads the results
    is selected: a few CPU-minutes of compiles that then overlap the rest of the suite."""
    if session.config.option.collectonly:
        return
    if HAS_TRITON_PACKAGE and any(
            item.path.name == "test_triton_lowering.py" and "lowered" in item.fixturenames
            for item in session.items):
        _start_lowering(Path(tempfile.mkdtemp(prefix="opsd-lowering-")))


def _start_lowering(work_dir: Path):
    import triton_lowering

    _LOWERING["dir"] = work_dir
    _LOWERING["job"] = triton_lowering.start(work_dir)
    return _LOWERING["job"]


def lowering_job(tmp_path_factory: pytest.TempPathFactory):
    """The sweep started at collection (or now, when collection did not start one)."""
    return _LOWERING.get("job") or _start_lowering(tmp_path_factory.mktemp("lowering"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    job = _LOWERING.get("job")
    if job is not None and job.process.poll() is None:
        job.process.kill()
    if "dir" in _LOWERING and str(_LOWERING["dir"]).startswith(tempfile.gettempdir()):
        shutil.rmtree(_LOWERING["dir"], ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    # numpy in the Triton interpreter warns about inf - inf on lanes that tl.where discards.
    config.addinivalue_line("filterwarnings",
                            "ignore::RuntimeWarning:triton.runtime.interpreter")


# --- seeds and inputs -------------------------------------------------------------------------


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed per test (stable across runs, different between tests)."""
    return zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("OPSD_TEST_SEED", "0"))


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def make_labels(gen: torch.Generator, token_shape: tuple[int, ...], vocab: int, *,
                mask_frac: float = 0.25, ignore_index: int = -100,
                empty_sequence: bool = False) -> torch.Tensor:
    """Random labels with about `mask_frac` of them ignored; at least one kept and (when
    mask_frac > 0) one ignored. empty_sequence: the whole first sequence of [B, T] is ignored."""
    labels = torch.randint(0, vocab, token_shape, generator=gen)
    flat = labels.view(-1)
    if mask_frac > 0:
        drop = torch.rand(flat.shape, generator=gen) < mask_frac
        drop[0] = True
        drop[-1] = False
        flat[drop] = ignore_index
    if empty_sequence:
        labels[0] = ignore_index
    return labels.to(DEVICE)


@dataclass
class FusedInputs:
    """Inputs of `fused_linear_divergence`, kept in float64 on DEVICE; cast per use."""

    student_hidden: torch.Tensor
    weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor | None = None
    student_bias: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    # Leaves that get gradients (names of the tensor fields above).
    trainable: tuple[str, ...] = ("student_hidden", "weight", "student_bias")

    @property
    def token_shape(self) -> tuple[int, ...]:
        return tuple(self.student_hidden.shape[:-1])

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def with_(self, **changes) -> FusedInputs:
        return replace(self, **changes)


def make_fused_inputs(
    seed: int,
    token_shape: tuple[int, ...] = (37,),
    hidden: int = 16,
    vocab: int = 257,
    dtype: torch.dtype = torch.float32,
    *,
    labels: bool = True,
    mask_frac: float = 0.25,
    ignore_index: int = -100,
    empty_sequence: bool = False,
    teacher_hidden_size: int | None = None,
    bias: bool = False,
    token_weights: bool = False,
    logit_std: float = 2.0,
) -> FusedInputs:
    """Random (never zero) hidden states and heads. The inputs are rounded to `dtype` once so
    that every consumer (ours, the float64 oracle, plain PyTorch) sees the same numbers.

    teacher_hidden_size: a separate teacher head of that hidden size (else the head is shared
    and the teacher's hidden states are a perturbation of the student's, as in OPSD)."""
    gen = generator(seed)

    def q(x: torch.Tensor) -> torch.Tensor:  # round to the test dtype, keep float64
        return x.to(dtype).to(torch.float64).to(DEVICE)

    h_s = randn(gen, *token_shape, hidden)
    w = randn(gen, vocab, hidden, scale=logit_std / hidden**0.5)
    if teacher_hidden_size is None:
        h_t, w_t = h_s + randn(gen, *token_shape, hidden, scale=0.7), None
    else:
        h_t = randn(gen, *token_shape, teacher_hidden_size)
        w_t = q(randn(gen, vocab, teacher_hidden_size, scale=logit_std / teacher_hidden_size**0.5))
    return FusedInputs(
        student_hidden=q(h_s), weight=q(w), teacher_hidden=q(h_t), teacher_weight=w_t,
        student_bias=q(randn(gen, vocab, scale=0.5)) if bias else None,
        teacher_bias=q(randn(gen, vocab, scale=0.5)) if bias else None,
        labels=make_labels(gen, token_shape, vocab, mask_frac=mask_frac,
                           ignore_index=ignore_index, empty_sequence=empty_sequence)
        if labels else None,
        token_weights=(torch.rand(token_shape, generator=gen, dtype=torch.float64) + 0.5)
        .float().to(DEVICE) if token_weights else None,
        dtype=dtype,
    )


def upstream_grad(seed: int, reduction: str, token_shape: tuple[int, ...]) -> torch.Tensor:
    """A non-trivial d out / d loss: a scalar != 1, or non-uniform per-token values."""
    gen = generator(seed + 1)
    if reduction == "none":
        return (torch.rand(token_shape, generator=gen, dtype=torch.float64) * 2 - 0.5).to(DEVICE)
    return torch.tensor(1.0 + torch.rand((), generator=gen).item(), dtype=torch.float64,
                        device=DEVICE)


@dataclass
class Result:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]


def _leaves(inp: FusedInputs, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    out = {}
    for name in ("student_hidden", "weight", "teacher_hidden", "teacher_weight", "student_bias",
                 "teacher_bias"):
        x = getattr(inp, name)
        if x is not None:
            x = x.detach().to(dtype, copy=True).requires_grad_(name in inp.trainable)
        out[name] = x
    return out


def _backward(loss: torch.Tensor, upstream: torch.Tensor | None,
              leaves: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    if upstream is not None and any(x is not None and x.requires_grad for x in leaves.values()):
        (loss * upstream.to(loss.dtype)).sum().backward()
    return {k: (None if x is None else x.grad) for k, x in leaves.items()}


def run_fused(inp: FusedInputs, *, backend: str, reduction: str = "mean", num_items=None,
              upstream: torch.Tensor | None = None, ignore_index: int = -100, **options) -> Result:
    """Our `fused_linear_divergence` on the inputs in their test dtype, with gradients."""
    leaves = _leaves(inp, inp.dtype)
    loss, stats = fused_linear_divergence(
        leaves["student_hidden"], leaves["weight"], leaves["teacher_hidden"],
        leaves["teacher_weight"], labels=inp.labels, ignore_index=ignore_index,
        token_weights=inp.token_weights, reduction=reduction, num_items=num_items,
        student_bias=leaves["student_bias"], teacher_bias=leaves["teacher_bias"],
        backend=backend, return_stats=True, **options)
    assert loss.dtype == torch.float32
    grads = _backward(loss, upstream, leaves)
    return Result(loss.detach(), stats._asdict(), grads)


def reference_fused(inp: FusedInputs, *, logits_dtype: torch.dtype = torch.float64,
                    math_dtype: torch.dtype = torch.float64, reduction: str = "mean",
                    num_items=None, upstream: torch.Tensor | None = None,
                    ignore_index: int = -100, **options) -> Result:
    """The oracle (float64 throughout) or plain PyTorch (logits_dtype = the input dtype, math in
    fp32): materialised logits, `reference_stats`, `reference_reduce`, autograd."""
    leaves = _leaves(inp, logits_dtype)
    w_t = leaves["teacher_weight"]
    w_t = leaves["weight"].detach() if w_t is None else w_t.detach()
    b_t = leaves["teacher_bias"]
    z_s = F.linear(leaves["student_hidden"], leaves["weight"], leaves["student_bias"])
    z_t = F.linear(leaves["teacher_hidden"].detach(), w_t, None if b_t is None else b_t.detach())
    return _reference_from_logits(z_s.to(math_dtype), z_t.to(math_dtype), inp.labels,
                                  inp.token_weights, leaves, reduction=reduction,
                                  num_items=num_items, upstream=upstream,
                                  ignore_index=ignore_index, **options)


def _reference_from_logits(z_s, z_t, labels, token_weights, leaves, *, reduction, num_items,
                           upstream, ignore_index, **options) -> Result:
    token_shape = tuple(z_s.shape[:-1])
    n, vocab = z_s[..., 0].numel(), z_s.shape[-1]
    flat_labels = None if labels is None else labels.reshape(n)
    stats = reference_stats(z_s.reshape(n, vocab), z_t.reshape(n, vocab), flat_labels,
                            ignore_index=ignore_index, **options)
    valid = (torch.ones(n, dtype=torch.bool, device=z_s.device) if labels is None
             else flat_labels != ignore_index)
    weights = None if token_weights is None else token_weights.reshape(n).to(z_s.dtype)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(z_s.dtype)
    loss = reference_reduce(stats["divergence"], valid, token_weights=weights,
                            reduction=reduction, num_items=num_items, batch_shape=token_shape)
    grads = _backward(loss, upstream, leaves)
    stats = {k: x.detach().reshape(token_shape) for k, x in stats.items()}
    return Result(loss.detach(), stats, grads)


@dataclass
class LogitsInputs:
    student_logits: torch.Tensor  # float64, rounded to dtype
    teacher_logits: torch.Tensor
    labels: torch.Tensor | None
    token_weights: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32


def make_logits_inputs(seed: int, token_shape: tuple[int, ...] = (37,), vocab: int = 257,
                       dtype: torch.dtype = torch.float32, *, labels: bool = True,
                       mask_frac: float = 0.25, ignore_index: int = -100,
                       token_weights: bool = False, logit_std: float = 2.0) -> LogitsInputs:
    gen = generator(seed)
    z_s = randn(gen, *token_shape, vocab, scale=logit_std)
    z_t = z_s + randn(gen, *token_shape, vocab, scale=logit_std / 2)
    q = lambda x: x.to(dtype).to(torch.float64).to(DEVICE)  # noqa: E731
    return LogitsInputs(
        q(z_s), q(z_t),
        make_labels(gen, token_shape, vocab, mask_frac=mask_frac, ignore_index=ignore_index)
        if labels else None,
        (torch.rand(token_shape, generator=gen) + 0.5).to(DEVICE) if token_weights else None,
        dtype,
    )


def run_divergence(inp: LogitsInputs, *, backend: str, reduction: str = "mean", num_items=None,
                   upstream: torch.Tensor | None = None, ignore_index: int = -100,
                   **options) -> Result:
    z_s = inp.student_logits.detach().to(inp.dtype, copy=True).requires_grad_()
    z_t = inp.teacher_logits.to(inp.dtype)
    loss, stats = divergence(z_s, z_t, labels=inp.labels, ignore_index=ignore_index,
                             token_weights=inp.token_weights, reduction=reduction,
                             num_items=num_items, backend=backend, return_stats=True, **options)
    assert loss.dtype == torch.float32
    grads = _backward(loss, upstream, {"student_logits": z_s})
    return Result(loss.detach(), stats._asdict(), grads)


def reference_divergence(inp: LogitsInputs, *, logits_dtype: torch.dtype = torch.float64,
                         math_dtype: torch.dtype = torch.float64, reduction: str = "mean",
                         num_items=None, upstream: torch.Tensor | None = None,
                         ignore_index: int = -100, **options) -> Result:
    z_s = inp.student_logits.detach().to(logits_dtype, copy=True).requires_grad_()
    z_t = inp.teacher_logits.to(logits_dtype)
    return _reference_from_logits(z_s.to(math_dtype), z_t.to(math_dtype), inp.labels,
                                  inp.token_weights, {"student_logits": z_s},
                                  reduction=reduction, num_items=num_items, upstream=upstream,
                                  ignore_index=ignore_index, **options)


def compare_results(ours: Result, ref: Result, dtype: torch.dtype = torch.float32, *,
                    stats: bool = True, baseline: Result | None = None) -> None:
    """Loss, every gradient and (optionally) every stat. Low precision: the flash-attention
    rule against `baseline` (plain PyTorch in that dtype) as well as the coarse TOL bound; and
    since the library promises fp32 logits (never a low-precision GEMM output rounded before
    the softmax, Liger #1432), forward values (loss, stats) must meet the fp32 tolerance."""
    # (what, ours, oracle, plain PyTorch, is a gradient, error scale or None for max |oracle|);
    # per-token values (log-probs, entropies, divergences) are judged on the scale of 1: they
    # come out of sums of O(1) terms, so a divergence near 0 carries their rounding.
    checks = [("loss", ours.loss, ref.loss, baseline and baseline.loss, False, None)]
    for name, g in ref.grads.items():
        if g is None:
            assert ours.grads[name] is None, f"grad of {name}: expected none"
            continue
        assert ours.grads[name] is not None, f"grad of {name}: missing"
        assert ours.grads[name].dtype == dtype, f"grad of {name}: dtype {ours.grads[name].dtype}"
        checks.append((f"grad of {name}", ours.grads[name], g,
                       baseline and baseline.grads[name], True, None))
    if stats:
        for name in STAT_NAMES:
            expected = ref.stats[name]
            checks.append((f"stat {name}", ours.stats[name], expected,
                           baseline and baseline.stats[name], False,
                           max(expected.abs().max().item(), 1.0)))
    for what, mine, expected, base, backward, scale in checks:
        if dtype in LOW_PRECISION:
            assert base is not None, "low-precision checks need the plain-PyTorch baseline"
            assert_fa_rule(mine, base, expected, backward=backward, what=what)
        assert_close(mine, expected, dtype if backward else torch.float32, scale=scale,
                     what=what)
