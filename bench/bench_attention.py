"""Shared-prefix attention vs the plain approach: time and incremental peak memory of forward +
backward over G groups of n suffix rows sharing one prefix each.

    python -m pytest bench/bench_attention.py -s --benchmark-json=.benchmarks/attention.json

Peers, on identical inputs (query / key / value / prefix K/V all require grad):
- `plain_sdpa`: what a batch without prefix sharing does: each group's prefix K/V repeated
  for each of its rows, concatenated with the row's suffix, torch SDPA with a boolean mask,
  autograd (`opsd_kernels.reference.attention.sdpa_prefix_attention`). It runs first in each
  case and is the reference for the ratios and the accuracy check.
- `opsd_torch`: `shared_prefix_attention(..., backend="torch")` (two-part form, analytic
  backward).
- `opsd_triton`: `shared_prefix_attention(..., backend="triton")`; CUDA only (skipped
  elsewhere: the interpreter is not a timing).

Cases: CPU gets one small fp32 shape; CUDA the training shape P = R = 1024, n = 8, Hq = 16,
Hkv = 8, D = 128, bf16, G = 2. Every opsd row records `time_vs_plain` and `peak_vs_plain`
(ratios to plain_sdpa measured in the same run) in its extra_info, and the last test prints
the table. The time ratios come from interleaved rounds (plain_sdpa, opsd, plain_sdpa, ...)
that each opsd test runs after its own timing, so that a change of machine load hits both
alike; an opsd row shows its median and plain_sdpa's over those rounds ("plain ms"). Knobs:
OPSD_BENCH_SMOKE=1 (tiny shapes, one round), OPSD_BENCH_ROUNDS (timed rounds, and interleaved
pairs), OPSD_BENCH_DEVICE.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from opsd_kernels.attention import shared_prefix_attention
from opsd_kernels.profiling import peak_bytes
from opsd_kernels.reference.attention import sdpa_prefix_attention

SMOKE = os.environ.get("OPSD_BENCH_SMOKE") == "1"
DEVICE = torch.device(
    os.environ.get("OPSD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
_ROUNDS = 1 if SMOKE else 10 if DEVICE.type == "cuda" else 7
ROUNDS = int(os.environ.get("OPSD_BENCH_ROUNDS", _ROUNDS))
WARMUP_ROUNDS = 0 if SMOKE or DEVICE.type != "cuda" else 2


@dataclass(frozen=True)
class Case:
    groups: int
    n: int  # rows per group
    p: int
    r: int
    hq: int
    hkv: int
    d: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (f"G{self.groups}xn{self.n}-P{self.p}-R{self.r}-Hq{self.hq}-Hkv{self.hkv}"
                f"-D{self.d}-{dt}")


def _cases() -> list[Case]:
    if SMOKE:
        return [Case(2, 3, 32, 16, 4, 2, 16, torch.float32)]
    if DEVICE.type == "cuda":
        return [Case(2, 8, 1024, 1024, 16, 8, 128, torch.bfloat16)]
    return [Case(2, 4, 512, 128, 4, 2, 64, torch.float32)]


Step = Callable[[], torch.Tensor]


@dataclass
class Inputs:
    leaves: list[torch.Tensor]  # query, key, value, prefix_key, prefix_value (require grad)
    group_index: torch.Tensor
    grad_out: torch.Tensor


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    b = case.groups * case.n
    shapes = [(b, case.hq, case.r, case.d), (b, case.hkv, case.r, case.d),
              (b, case.hkv, case.r, case.d), (case.groups, case.hkv, case.p, case.d),
              (case.groups, case.hkv, case.p, case.d)]
    leaves = [torch.randn(*s, generator=g).to(DEVICE, case.dtype).requires_grad_()
              for s in shapes]
    group_index = torch.arange(case.groups).repeat_interleave(case.n).to(DEVICE)
    grad_out = torch.randn(*shapes[0], generator=g).to(DEVICE, case.dtype)
    return Inputs(leaves, group_index, grad_out)


def _peer_fn(name: str):
    if name == "plain_sdpa":
        return sdpa_prefix_attention
    backend = name.removeprefix("opsd_")
    return lambda *a: shared_prefix_attention(*a, backend=backend)


PEERS = ("plain_sdpa", "opsd_torch", "opsd_triton")


def _skip_reason(name: str) -> str | None:
    if name == "opsd_triton" and DEVICE.type != "cuda":
        return "the Triton kernels are timed on CUDA only (on CPU they run interpreted)"
    return None


def _build(name: str, inp: Inputs) -> Step:
    fn = _peer_fn(name)

    def step() -> torch.Tensor:
        for x in inp.leaves:
            x.grad = None
        out = fn(*inp.leaves, inp.group_index)
        out.backward(inp.grad_out)
        return out.detach()

    return step


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _interleaved(steps: dict[str, Step], rounds: int) -> dict[str, float]:
    """Median seconds of each step over `rounds` rounds that run the steps in turn."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


_INPUTS: dict[Case, Inputs] = {}
# (case, peer) -> (median seconds, peak bytes, plain_sdpa's median seconds in the same interleaved
# rounds; an opsd peer's median is the one of those rounds); the reference output and grads.
_RESULTS: dict[tuple[str, str], tuple[float, int | None, float | None]] = {}
_REFERENCE: dict[str, list[torch.Tensor]] = {}


def _inputs(case: Case) -> Inputs:
    if case not in _INPUTS:
        _INPUTS.clear()
        _REFERENCE.clear()
        _INPUTS[case] = make_inputs(case)
    return _INPUTS[case]


def _rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
               .item() for a, b in zip(got, want, strict=True))


PARAMS = [pytest.param(case, name, id=f"{name}-{case.label}") for case in _cases()
          for name in PEERS]


@pytest.mark.parametrize(("case", "peer_name"), PARAMS)
def test_attention(benchmark, case: Case, peer_name: str) -> None:
    reason = _skip_reason(peer_name)
    if reason is not None:
        pytest.skip(reason)
    inp = _inputs(case)
    step = _build(peer_name, inp)
    step()  # warm-up: compilation, lazy initialisation
    _sync()
    try:
        peak, out = peak_bytes(step, DEVICE)
    except torch.OutOfMemoryError as e:
        pytest.skip(f"{peer_name} ran out of memory: {str(e).splitlines()[0]}")
    results = [out] + [x.grad for x in inp.leaves]
    _REFERENCE.setdefault(case.label, [t.clone() for t in results])

    def timed() -> torch.Tensor:
        res = step()
        _sync()
        return res

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    _RESULTS[(case.label, peer_name)] = (median, peak, None)
    info = dict(peer=peer_name, case=case.label, peak_bytes=peak,
                rel_err_vs_plain=_rel_err(results, _REFERENCE[case.label]),
                device=DEVICE.type, device_name=torch.cuda.get_device_name(DEVICE)
                if DEVICE.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                load_avg_1min=os.getloadavg()[0], torch=torch.__version__, smoke=SMOKE)
    plain = _RESULTS.get((case.label, "plain_sdpa"))
    if plain is not None and peer_name != "plain_sdpa":
        paired = _interleaved({"plain": _build("plain_sdpa", inp), "ours": step}, ROUNDS)
        info["interleaved_plain_s"], info["interleaved_s"] = paired["plain"], paired["ours"]
        info["time_vs_plain"] = paired["ours"] / paired["plain"]
        _RESULTS[(case.label, peer_name)] = (paired["ours"], peak, paired["plain"])
        info["time_vs_plain_separate_rounds"] = median / plain[0]
        if peak and plain[1]:
            info["peak_vs_plain"] = peak / plain[1]
    benchmark.extra_info.update(info)
    # Same math: a timing of a wrong result compares nothing.
    tol = 2e-2 if case.dtype == torch.float32 else 1e-1
    assert info["rel_err_vs_plain"] < tol, info
    for x in inp.leaves:
        x.grad = None
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def test_print_ratios() -> None:
    """The ratio table of this run (pytest -s shows it)."""
    if not _RESULTS:
        pytest.skip("no peer ran")
    lines = [f"{'case':<44} {'peer':<12} {'median ms':>10} {'plain ms':>9} {'peak MiB':>9} "
             f"{'time/plain':>10} {'peak/plain':>10}"]
    for (label, peer), (median, peak, paired_plain) in _RESULTS.items():
        plain_p = _RESULTS.get((label, "plain_sdpa"), (None, None, None))[1]
        if peer == "plain_sdpa":
            plain_ms, t_ratio = "-", "1.00"
        else:
            plain_ms = f"{paired_plain * 1e3:.2f}" if paired_plain else "-"
            t_ratio = f"{median / paired_plain:.2f}" if paired_plain else "-"
        p_ratio = f"{peak / plain_p:.2f}" if peak and plain_p else "-"
        peak_mib = f"{peak / 2**20:.1f}" if peak is not None else "-"
        lines.append(f"{label:<44} {peer:<12} {median * 1e3:>10.2f} {plain_ms:>9} {peak_mib:>9} "
                     f"{t_ratio:>10} {p_ratio:>10}")
    print("\n" + "\n".join(lines))
