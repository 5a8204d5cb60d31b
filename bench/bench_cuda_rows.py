"""The CUDA row kernel vs the Triton row kernel vs a plain copy, on [4096 x 128256] blocks.

    python -m pytest bench/bench_cuda_rows.py -rs --benchmark-json=.benchmarks/cuda_rows.json

Needs a CUDA device and opsd_kernels._C built with CUDA kernels (skipped with the reason
otherwise). Every round restores the student block first (untimed: the kernels write their
gradient over it). Figures, per divergence:
  - time of the CUDA row step (csrc/cuda/divergence.cu) and of `divergence_rows_triton_`;
  - achieved bandwidth = bytes the kernel must move / time, where a row step reads both
    blocks once per pass (2 passes: forward KL, sampled; 3: reverse KL, JSD, clipping) and
    writes the gradient once, against the bandwidth of `torch.Tensor.copy_` of one block
    (read + write) in the same run. The "minimal" figure counts one read of each block and
    one write (what a one-pass kernel would move).
Targets (`test_targets`, reported in its extra_info; a failure only with OPSD_BENCH_STRICT=1):
CUDA time <= 1.2x Triton, achieved bandwidth >= 70% of copy bandwidth.
Knobs: OPSD_BENCH_SMOKE=1 (a [64 x 4099] block, one round), OPSD_BENCH_ROUNDS.
"""

from __future__ import annotations

import os

import pytest
import torch

from opsd_kernels.divergence_options import RowOptions
from opsd_kernels.types import NUM_STATS

SMOKE = os.environ.get("OPSD_BENCH_SMOKE") == "1"
STRICT = os.environ.get("OPSD_BENCH_STRICT") == "1"
ROWS, VOCAB = (64, 4099) if SMOKE else (4096, 128256)
ROUNDS = int(os.environ.get("OPSD_BENCH_ROUNDS", 1 if SMOKE else 10))
WARMUP = 0 if SMOKE else 2
TARGET_VS_TRITON = 1.2
TARGET_OF_COPY = 0.70


def _why_not() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    from opsd_kernels._native import device_error

    return device_error(torch.device("cuda"))


_WHY = _why_not()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"{_WHY}")

# (label, kind, beta, clip): one divergence per pass structure.
CASES = [
    ("forward_kl", "forward_kl", 0.0, None),  # 2 passes
    ("jsd", "jsd", 0.5, None),  # 3 passes
    ("forward_kl_clip", "forward_kl", 0.0, 0.05),  # 3 passes, OPSD's setting
]
PASSES = {"forward_kl": 2, "jsd": 3, "forward_kl_clip": 3}
# Medians (s) by (peer, case, dtype), for test_targets.
_MEDIANS: dict[tuple[str, str, str], float] = {}


class Blocks:
    def __init__(self, dtype: torch.dtype) -> None:
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.s0 = torch.randn(ROWS, VOCAB, device="cuda", generator=gen, dtype=torch.float32)
        self.t = (self.s0 + 0.5 * torch.randn(ROWS, VOCAB, device="cuda", generator=gen)).to(dtype)
        self.s0 = self.s0.mul_(2.0).to(dtype)
        self.s = torch.empty_like(self.s0)
        self.labels = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=gen)
        self.labels[::8] = -100
        self.coef = torch.rand(ROWS, device="cuda", generator=gen) + 0.5
        self.stats = torch.empty(ROWS, NUM_STATS, device="cuda")
        self.copy_dst = torch.empty_like(self.s0)

    def restore(self) -> None:
        self.s.copy_(self.s0)
        torch.cuda.synchronize()


_BLOCKS: dict[torch.dtype, Blocks] = {}


def _blocks(dtype: torch.dtype) -> Blocks:
    if dtype not in _BLOCKS:
        _BLOCKS.clear()
        torch.cuda.empty_cache()
        _BLOCKS[dtype] = Blocks(dtype)
    return _BLOCKS[dtype]


def _step(peer: str):
    if peer == "cuda":
        from opsd_kernels.ops.divergence_native import divergence_rows_native_

        return divergence_rows_native_
    from opsd_kernels.ops.divergence import divergence_rows_triton_

    return divergence_rows_triton_


def _record(benchmark, peer: str, case: str, dtype: torch.dtype, bytes_moved: int,
            bytes_minimal: int) -> None:
    median = benchmark.stats.stats.median
    _MEDIANS[(peer, case, str(dtype))] = median
    benchmark.extra_info.update(
        peer=peer, case=case, dtype=str(dtype).removeprefix("torch."), rows=ROWS, vocab=VOCAB,
        bytes_moved=bytes_moved, achieved_gbps=bytes_moved / median / 1e9,
        minimal_gbps=bytes_minimal / median / 1e9, device_name=torch.cuda.get_device_name(),
        torch=torch.__version__, smoke=SMOKE)


PARAMS = [pytest.param(peer, case, dtype, id=f"{peer}-{case[0]}-{str(dtype)[6:]}")
          for dtype in (torch.float32, torch.bfloat16) for case in CASES
          for peer in ("cuda", "triton") if not (peer == "triton" and dtype != torch.float32)]


@pytest.mark.parametrize("peer, case, dtype", PARAMS)
def test_row_step(benchmark, peer, case, dtype):
    label, kind, beta, clip = case
    if peer == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("Triton is not installed")
    b = _blocks(dtype)
    opts = RowOptions.make(kind, beta, 1.0, 1.0, clip, None, -100)
    step = _step(peer)
    b.restore()
    step(b.s, b.t, b.labels, b.coef, b.stats, opts, True)  # warm-up: JIT, autotuning
    torch.cuda.synchronize()

    def timed():
        step(b.s, b.t, b.labels, b.coef, b.stats, opts, True)
        torch.cuda.synchronize()

    benchmark.pedantic(timed, setup=b.restore, rounds=ROUNDS, warmup_rounds=WARMUP,
                       iterations=1)
    elem = b.s.element_size()
    n = ROWS * VOCAB
    moved = n * (PASSES[label] * 2 * elem + elem)
    _record(benchmark, peer, label, dtype, moved, n * 3 * elem)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_copy(benchmark, dtype):
    """The bandwidth yardstick: one [ROWS x VOCAB] block copied (read + write)."""
    b = _blocks(dtype)
    b.copy_dst.copy_(b.s0)
    torch.cuda.synchronize()

    def timed():
        b.copy_dst.copy_(b.s0)
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    moved = 2 * b.s0.numel() * b.s0.element_size()
    _record(benchmark, "copy", "copy", dtype, moved, moved)


def test_targets(benchmark):
    """The targets, from the medians measured above (run the whole file)."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    report, failed = {}, []
    for label, _, _, _ in CASES:
        for dtype in ("torch.float32", "torch.bfloat16"):
            cuda, copy = _MEDIANS.get(("cuda", label, dtype)), _MEDIANS.get(("copy", "copy", dtype))
            if cuda is None or copy is None:
                continue
            elem = 4 if dtype == "torch.float32" else 2
            n = ROWS * VOCAB
            of_copy = (n * (PASSES[label] * 2 * elem + elem) / cuda) / (2 * n * elem / copy)
            report[f"{label}/{dtype[6:]}/of_copy_bandwidth"] = round(of_copy, 3)
            if of_copy < TARGET_OF_COPY:
                failed.append(f"{label} {dtype}: {of_copy:.2f} of copy bandwidth")
            triton = _MEDIANS.get(("triton", label, dtype))
            if triton is not None:
                ratio = cuda / triton
                report[f"{label}/{dtype[6:]}/vs_triton"] = round(ratio, 3)
                if ratio > TARGET_VS_TRITON:
                    failed.append(f"{label} {dtype}: {ratio:.2f}x Triton's time")
    if not report:
        pytest.skip("no medians: run the whole file")
    benchmark.extra_info.update(targets=report, failed=failed)
    print("\nCUDA row step targets:", report, "FAILED: " + "; ".join(failed) if failed else "")
    if STRICT:
        assert not failed, failed
