"""The native CPU backend against the PyTorch one and the GEMM floor (fp32, CPU threads).

    python -m pytest bench/bench_native.py --benchmark-json=.benchmarks/native.json
    python bench/report_native.py .benchmarks/native.json --out-dir /tmp

Two groups, every figure a ratio to a peer of the same run:
- "rows": the row step alone on a [rows, V] block of both roles' logits, divergence and
  gradient: `divergence_rows_native_` vs `divergence_rows_torch_` (PyTorch elementwise ops).
  The block is restored from a copy before every round (not timed).
- "e2e": `fused_linear_divergence` forward + backward (generalized JSD, frozen head) with
  backend native and torch, and the bare GEMMs such a loss needs (both roles' logits, grad of
  the hidden states), with each one's incremental peak memory.
Knobs: OPSD_BENCH_SMOKE=1 (tiny shapes, one round), OPSD_BENCH_ROUNDS, OPSD_BENCH_THREADS
(default 2).
"""

from __future__ import annotations

import functools
import gc
import os

import pytest
import torch

from bench.bench_divergence import _device_name
from bench.peers import PEERS, Case, Inputs, make_inputs
from opsd_kernels import env_report
from opsd_kernels.divergence_options import RowOptions
from opsd_kernels.ops.divergence_torch import divergence_rows_torch_
from opsd_kernels.profiling import peak_bytes

SMOKE = os.environ.get("OPSD_BENCH_SMOKE") == "1"
THREADS = int(os.environ.get("OPSD_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("OPSD_BENCH_ROUNDS", "1" if SMOKE else "5"))
CPU = torch.device("cpu")
NATIVE_MISSING = None if env_report()["native"].startswith("built") else env_report()["native"]

# Row step: rows of the chunk the native backend uses at V = 32768 (64 MiB of fp32 logits).
ROW_SHAPES = [(8, 1000)] if SMOKE else [(256, 32768)]
ROW_KINDS = {
    "jsd": ("jsd", 0.5, None),
    "forward_kl": ("forward_kl", 0.5, None),
    "reverse_kl": ("reverse_kl", 0.5, None),
    "forward_kl_clip": ("forward_kl", 0.5, 0.05),
}
E2E_CASES = [Case(64, 32, 512, torch.float32, CPU)] if SMOKE else [
    Case(4096, 512, 32768, torch.float32, CPU)
]
E2E_PEERS = ["bare_gemms", "opsd_torch", "opsd_native"]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _info(benchmark, **fields) -> None:
    benchmark.extra_info.update(
        **fields, threads=THREADS, device_name=_device_name(), cpu_count=os.cpu_count(),
        load_avg_1min=os.getloadavg()[0], torch=torch.__version__, native=env_report()["native"],
        smoke=SMOKE,
    )


# --- the row step ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _block(rows: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(rows, vocab, generator=g) * 2.0
    t = s + torch.randn(rows, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::8] = -100
    return s, t, labels, torch.rand(rows, generator=g) + 0.5


def _row_step(name: str):
    if name == "torch":
        return divergence_rows_torch_
    from opsd_kernels.ops.divergence_native import divergence_rows_native_

    return divergence_rows_native_


@pytest.mark.parametrize("step", ["torch", "native"])
@pytest.mark.parametrize("kind", list(ROW_KINDS))
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=lambda s: f"C{s[0]}-V{s[1]}")
def test_row_step(benchmark, shape, kind, step) -> None:
    if step == "native" and NATIVE_MISSING is not None:
        pytest.skip(f"native: {NATIVE_MISSING}")
    div, beta, clip = ROW_KINDS[kind]
    opts = RowOptions.make(div, beta, 1.0, 1.0, clip, None, -100)
    s0, t, labels, coef = _block(*shape)
    s, stats = s0.clone(), torch.empty(shape[0], 7)
    fn = _row_step(step)

    def restore() -> None:  # the step wrote its gradient over the logits
        s.copy_(s0)

    benchmark.pedantic(lambda: fn(s, t, labels, coef, stats, opts, True), setup=restore,
                       rounds=ROUNDS * 2, warmup_rounds=1, iterations=1)
    _info(benchmark, group="rows", peer=step, case=f"C{shape[0]}-V{shape[1]}-{kind}",
          rows=shape[0], v=shape[1], kind=kind)


# --- end to end -----------------------------------------------------------------------------------

_REFERENCE: dict[Case, tuple[torch.Tensor, torch.Tensor]] = {}


@functools.lru_cache(maxsize=1)
def _inputs(case: Case) -> Inputs:
    return make_inputs(case)


@pytest.mark.parametrize("peer_name", E2E_PEERS)
@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: c.label)
def test_fused_linear_divergence(benchmark, case: Case, peer_name: str) -> None:
    peer = PEERS[peer_name]
    reason = peer.skip(case)
    if reason is not None:
        pytest.skip(reason)
    inp = _inputs(case)
    step = peer.build(inp, case)
    inp.h_s.grad = None
    step()  # warm-up
    inp.h_s.grad = None
    peak, loss = peak_bytes(step, CPU)
    accuracy = {}
    if loss is not None:
        grad = inp.h_s.grad.clone()
        ref_loss, ref_grad = _REFERENCE.setdefault(case, (loss, grad))
        accuracy = dict(loss=loss.item(), loss_rel_err=((loss - ref_loss).abs() / ref_loss).item(),
                        grad_rel_err=((grad - ref_grad).abs().max() / ref_grad.abs().max()).item())

    def setup() -> None:
        inp.h_s.grad = None

    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    _info(benchmark, group="e2e", peer=peer_name, case=case.label, n=case.n, h=case.h, v=case.v,
          peak_bytes=peak, **accuracy)
    inp.h_s.grad = None
    gc.collect()
