"""Fused linear divergence vs its peers: time and incremental peak memory of forward + backward.

    python -m pytest bench/bench_divergence.py --benchmark-json=.benchmarks/divergence.json
    python bench/report.py .benchmarks/divergence.json

Shapes follow the device: CUDA gets the Llama-3 head (H=4096, V=128256, bf16) at four token
counts, frozen and trainable head; CPU gets one small fp32 shape with a frozen head (OPSD's LoRA
setting). Environment knobs: OPSD_BENCH_SMOKE=1 (tiny shapes, one round, both heads: lets a
test check this file still runs), OPSD_BENCH_ROUNDS, OPSD_BENCH_DEVICE, OPSD_BENCH_HEADS
("frozen", "trainable" or "frozen,trainable") and OPSD_BENCH_TOKENS (the CUDA token counts,
comma-separated). A peer whose package is missing is skipped with the reason.
"""

from __future__ import annotations

import functools
import gc
import os
import platform

import pytest
import torch

from bench.peers import PEERS, Case, Inputs, Peer, Step, make_inputs
from opsd_kernels.profiling import cpu_peak_supported, peak_bytes

SMOKE = os.environ.get("OPSD_BENCH_SMOKE") == "1"
DEVICE = torch.device(
    os.environ.get("OPSD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
# CPU is slow (2 cores here): one head and a few rounds keep the suite to a few minutes.
_HEADS = "frozen" if DEVICE.type == "cpu" and not SMOKE else "frozen,trainable"
TRAIN_WEIGHT = [
    h.strip() == "trainable" for h in os.environ.get("OPSD_BENCH_HEADS", _HEADS).split(",")
]
_ROUNDS = 1 if SMOKE else 10 if DEVICE.type == "cuda" else 3
ROUNDS = int(os.environ.get("OPSD_BENCH_ROUNDS", _ROUNDS))
WARMUP_ROUNDS = 0 if SMOKE or DEVICE.type != "cuda" else 2
# Liger's benchmark sizes (1k .. 8k) and 16k, where the memory target is set.
CUDA_TOKENS = [int(n) for n in os.environ.get("OPSD_BENCH_TOKENS",
                                              "1024,2048,4096,8192,16384").split(",")]


def _cases() -> list[Case]:
    if SMOKE:
        shapes = [(64, 32, 512, torch.float32)]
    elif DEVICE.type == "cuda":
        shapes = [(n, 4096, 128256, torch.bfloat16) for n in CUDA_TOKENS]
    else:
        shapes = [(2048, 256, 32768, torch.float32)]
    return [
        Case(n, h, v, dt, DEVICE, train_weight=t) for t in TRAIN_WEIGHT for n, h, v, dt in shapes
    ]


# Cases outermost so consecutive tests share one set of inputs (the GPU head is 1 GB), and
# naive, the accuracy reference, runs first within each case.
PARAMS = [
    pytest.param(case, name, id=f"{name}-{case.label}") for case in _cases() for name in PEERS
]

# Per case: (peer name, loss, student-hidden gradient) of the first peer that computed a loss.
_REFERENCE: dict[Case, tuple[str, torch.Tensor, torch.Tensor]] = {}


@functools.lru_cache(maxsize=1)
def _inputs(case: Case) -> Inputs:
    return make_inputs(case)


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _clear_grads(inp: Inputs) -> None:
    inp.h_s.grad = None
    inp.w.grad = None


def _prepare(peer: Peer, inp: Inputs, case: Case) -> tuple[Step, int | None, dict]:
    """Build, warm up, measure memory and accuracy outside the timed region; skip what
    cannot run here."""
    try:
        step = peer.build(inp, case)
        _clear_grads(inp)
        step()  # warm-up: compilation, autotuning, lazy initialisation
        _sync()
        _clear_grads(inp)
        peak, loss = peak_bytes(step, DEVICE)
    except NotImplementedError as e:  # a backend that exists but lacks this op yet
        pytest.skip(f"{peer.name}: {e}")
    except ImportError as e:  # a peer whose package this machine lacks
        pytest.skip(f"{peer.name}: {e} (install it, or `make gpu-wheels` for a GPU machine)")
    except torch.OutOfMemoryError as e:
        oom = f"{peer.name} ran out of memory: {str(e).splitlines()[0]}"
    else:
        return step, peak, _accuracy(peer, inp, case, loss)
    # Out of the except block, so the traceback and the tensors its frames hold are gone.
    _clear_grads(inp)
    gc.collect()
    torch.cuda.empty_cache()
    pytest.skip(oom)


def _accuracy(peer: Peer, inp: Inputs, case: Case, loss: torch.Tensor | None) -> dict:
    # Different peers must compute the same thing, or their timings compare nothing.
    if loss is None:  # the GEMM floor: its "gradient" is a stand-in
        return {"loss": None}
    grad = inp.h_s.grad.float()
    if case not in _REFERENCE:
        _REFERENCE.clear()  # one case at a time: the GPU reference gradient is 256 MB
        _REFERENCE[case] = (peer.name, loss.float(), grad.clone())
    ref_name, ref_loss, ref_grad = _REFERENCE[case]
    return {
        "loss": loss.float().item(),
        "reference_peer": ref_name,
        "loss_rel_err": ((loss.float() - ref_loss).abs() / ref_loss.abs()).item(),
        "grad_rel_err": ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item(),
    }


@pytest.mark.parametrize(("case", "peer_name"), PARAMS)
def test_divergence(benchmark, case: Case, peer_name: str) -> None:
    peer = PEERS[peer_name]
    reason = peer.skip(case)
    if reason is not None:
        pytest.skip(reason)
    inp = _inputs(case)
    step, peak, accuracy = _prepare(peer, inp, case)

    def timed() -> torch.Tensor | None:
        loss = step()
        _sync()  # CUDA launches are asynchronous: time the work, not the launch
        return loss

    benchmark.pedantic(
        timed,
        setup=lambda: _clear_grads(inp),
        rounds=ROUNDS,
        warmup_rounds=WARMUP_ROUNDS,
        iterations=1,
    )
    benchmark.extra_info.update(
        peer=peer_name,
        case=case.label,
        n=case.n,
        h=case.h,
        v=case.v,
        dtype=str(case.dtype).removeprefix("torch."),
        train_weight=case.train_weight,
        beta=case.beta,
        temperature=case.temperature,
        peak_bytes=peak,
        **accuracy,
        device=DEVICE.type,
        device_name=_device_name(),
        cpu_count=os.cpu_count(),
        # Other work on the machine skews timings (CPU runs especially): keep the evidence.
        load_avg_1min=os.getloadavg()[0],
        torch=torch.__version__,
        triton=_triton_version(),
        smoke=SMOKE,
    )
    _clear_grads(inp)
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def test_memory_helper_measures_a_known_allocation() -> None:
    """The peak figures are only as good as this helper: 64 MiB held must read as ~64 MiB."""
    if DEVICE.type == "cpu" and cpu_peak_supported() is not None:
        pytest.skip(cpu_peak_supported())
    size = 64 * 2**20
    measured, _ = peak_bytes(lambda: torch.ones(size // 4, device=DEVICE).sum(), DEVICE)
    assert measured is not None and 0.95 * size <= measured <= 1.25 * size, measured
