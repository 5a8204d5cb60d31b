"""The CUDA row kernel without a GPU.

1. Every csrc/cuda/*.cu compiles with nvcc (compile only, -arch=sm_80), warning-free; skipped
   when nvcc is not on PATH.
2. The torch-facing wrapper csrc/cuda/*.cpp is syntactically sound against this torch's
   headers (g++ -fsyntax-only; a CPU-only wheel lacks one generated CUDA config header, which
   is stubbed); skipped without g++ or the CUDA headers.
3. The per-row code the kernel runs (csrc/cuda/divergence_row.h) is built into a host harness
   (tests/csrc/divergence_rows_host.cpp, g++, std::threads standing in for a warp or block)
   and run on the CPU: against the float64 oracle through the row-step suite of
   test_divergence.py, and on what only this port has (16-byte packs with a scalar head and
   tail, misaligned and strided rows, bf16 rows, a separate or bf16 gradient buffer).

The compiles start together in the background when the first test needs one, and the nvcc and
torch-header checks come last, so they finish while the harness tests run: about 45 s of CPU
time in all (nvcc ~20 s), ~30 s on two idle cores.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import test_divergence as td
import torch
from conftest import assert_close

from opsd_kernels.divergence_options import KIND_CODES, RowOptions
from opsd_kernels.types import NUM_STATS

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
TORCH_SOURCES = sorted(CUDA_DIR.glob("*.cpp"))
HARNESS = ROOT / "tests" / "csrc" / "divergence_rows_host.cpp"
NVCC = shutil.which("nvcc")
CXX = os.environ.get("CXX") or shutil.which("g++")
TIMEOUT_S = 300
HOST_STEP = "cuda_host"

requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
requires_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ or $CXX)")
pytestmark = pytest.mark.slow  # compiles: nvcc, g++ against torch's headers, a host harness


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include dir (for cuda_runtime_api.h), found from nvcc."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if "CUDA_HOME" in os.environ else []
    if NVCC is not None:
        candidates.append(Path(NVCC).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((d for d in candidates if (d / "cuda_runtime_api.h").exists()), None)


# --- background compiles --------------------------------------------------------------------------


def _lower_priority() -> None:
    os.nice(10)


class Job:
    def __init__(self, cmd: list[str], *, background: bool = False) -> None:
        """background: a check nothing waits on soon (runs niced, so the harness build that
        the first tests need is not starved)."""
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=_lower_priority if background and hasattr(os, "nice") else None)
        self._out: str | None = None

    def result(self) -> tuple[int, str]:
        if self._out is None:
            try:
                self._out, _ = self.proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._out = f"timed out after {TIMEOUT_S} s"
                return -1, self._out
        return self.proc.returncode, self._out

    def check(self) -> str:
        rc, out = self.result()
        assert rc == 0, f"{' '.join(self.cmd)}\nfailed ({rc}):\n{out[-6000:]}"
        return out


def _torch_syntax_cmd(source: Path, stub_dir: Path) -> list[str] | None:
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include()
    if CXX is None or cuda_inc is None:
        return None
    incs = [Path(p) for p in include_paths()]
    # A CPU-only wheel ships c10/cuda/ but not the header CMake generates for it.
    macros = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if not any((d / macros).exists() for d in incs):
        (stub_dir / macros).parent.mkdir(parents=True, exist_ok=True)
        (stub_dir / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(stub_dir)
    flags = [a for d in [*incs, cuda_inc] for a in ("-isystem", str(d))]
    # torch >= 2.10 headers want C++20 (the CMake build takes torch's standard).
    return [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-DOPSD_WITH_CUDA",
            *flags, str(source)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory):
    """Every compile of this file, started at once; {name: Job or None (tool missing)}."""
    out = tmp_path_factory.mktemp("cuda_compile")
    started: dict[str, Job | None] = {}
    for src in CU_SOURCES:
        started[f"nvcc:{src.name}"] = None if NVCC is None else Job(
            [NVCC, "-std=c++17", "-c", "-arch=sm_80", "-Xcompiler", "-Wall,-Wextra",
             "-o", str(out / f"{src.stem}.o"), str(src)], background=True)
    for src in TORCH_SOURCES:
        cmd = _torch_syntax_cmd(src, out / "stub")
        started[f"torch:{src.name}"] = None if cmd is None else Job(cmd, background=True)
    lib = out / "libopsd_divergence_rows_host.so"
    started["harness"] = None if CXX is None else Job(
        [CXX, "-std=c++20", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-pthread",
         "-I", str(CUDA_DIR), "-o", str(lib), str(HARNESS)])
    started["harness_lib"] = lib  # type: ignore[assignment]
    yield started
    for job in started.values():
        if isinstance(job, Job) and job.proc.poll() is None:
            job.proc.kill()


def _no_warnings(out: str) -> None:
    lines = [ln for ln in out.splitlines() if "warning" in ln.lower()]
    assert not lines, "warnings:\n" + "\n".join(lines[:20])


# --- the host harness ---------------------------------------------------------------------------

_INT64, _FLOAT, _INT = ctypes.c_int64, ctypes.c_float, ctypes.c_int
_ARGTYPES = ([ctypes.c_void_p] * 6 + [_INT64] * 6
             + [_INT, _INT, _INT, _FLOAT, _FLOAT, _FLOAT, _FLOAT, _INT, _FLOAT, _INT, _INT64, _INT])


def row_threads(vocab: int) -> int:
    """The CUDA launch configuration (divergence_rows_cuda_row_threads): a warp per row up to
    V = 4096, a 256-thread block per row above."""
    return 32 if vocab <= 4096 else 256


HostStep = Callable[..., None]


@pytest.fixture(scope="module")
def host_step(jobs) -> HostStep:
    """The harness as a row step: step(s, t, labels, coef, stats, opts, write_grad, *,
    grad=None, threads=None). Same contract as the other steps (gradient over s when write_grad
    and no grad buffer is given); CPU tensors are used in place, others via CPU copies."""
    if jobs["harness"] is None:
        pytest.skip("no C++ compiler (g++ or $CXX)")
    out = jobs["harness"].check()
    _no_warnings(out)
    fn = ctypes.CDLL(str(jobs["harness_lib"])).opsd_divergence_rows_host
    fn.argtypes = _ARGTYPES
    fn.restype = _INT

    def dtype_code(x: torch.Tensor) -> int:
        assert x.dtype in (torch.float32, torch.bfloat16), x.dtype
        return int(x.dtype == torch.bfloat16)

    def run(s, t, labels, coef, stats, opts: RowOptions, write_grad: bool, grad, threads):
        rows, vocab = s.shape
        for x in (s, t, stats) + (() if grad is None else (grad,)):
            assert x.stride(-1) == 1 or x.shape[-1] == 1
        assert t.dtype == s.dtype and stats.dtype == torch.float32
        labels = None if labels is None else labels.contiguous()
        coef = coef.contiguous()
        g = (s if grad is None else grad) if write_grad else None
        rc = fn(s.data_ptr(), t.data_ptr(), None if g is None else g.data_ptr(),
                None if labels is None else labels.data_ptr(), coef.data_ptr(),
                stats.data_ptr(), rows, vocab, s.stride(0), t.stride(0),
                0 if g is None else g.stride(0), stats.stride(0), dtype_code(s),
                0 if g is None else dtype_code(g), KIND_CODES[opts.kind], opts.beta,
                opts.inv_tau_s, opts.inv_tau_t, opts.clip or 0.0, opts.clip is not None,
                1.0 if opts.softcap is None else opts.softcap, opts.softcap is not None,
                opts.ignore_index, row_threads(vocab) if threads is None else threads)
        assert rc == 0, "the harness rejected its arguments"

    def step(s, t, labels, coef, stats, opts, write_grad, *, grad=None, threads=None):
        if s.device.type == "cpu":
            run(s, t, labels, coef, stats, opts, write_grad, grad, threads)
            return
        cpu = [None if x is None else x.cpu() for x in (s, t, labels, coef, stats, grad)]
        run(*cpu[:5], opts, write_grad, cpu[5], threads)
        for mine, back in ((s, cpu[0]), (stats, cpu[4]), (grad, cpu[5])):
            if mine is not None:
                mine.copy_(back)

    return step


@pytest.fixture
def in_row_step_suite(host_step, monkeypatch):
    """The harness registered as a step of test_divergence.py for the duration of a test."""
    monkeypatch.setitem(td.STEPS, HOST_STEP, host_step)


# The row-step suite of test_divergence.py, run on the harness: (test name, parameters).
_SUITE: list[tuple[str, dict]] = (
    [("test_row_step_matches_reference", dict(kind=k, beta=b, opt_name=o))
     for k, b in td.KINDS for o in td.OPTIONS if not (k == "sampled" and "clip" in o)]
    + [("test_row_step_without_grad", dict(kind=k, beta=0.5))
       for k in ("jsd", "reverse_kl", "forward_kl", "sampled")]
    + [("test_row_step_without_labels", dict(kind=k)) for k in ("jsd", "forward_kl",
                                                                  "reverse_kl")]
    + [("test_row_step_several_vocab_tiles", dict(kind=k, beta=0.5))
       for k in ("jsd", "forward_kl", "sampled", "reverse_kl")]
    + [("test_row_step_strided_rows", {})]
    + [("test_top_k_row_step", dict(top_k=k, tail=tail))
       for k, tail in ((7, False), (7, True), (1, True))]
    + [("test_masked_rows_may_hold_garbage", dict(garbage=g))
       for g in (math.nan, math.inf, -math.inf)]
    + [("test_all_rows_masked", {})]
    + [(name, dict(kind=k, beta=b)) for name in
       ("test_very_large_logits", "test_tiny_temperature", "test_both_underflow_on_part_of_vocab")
       for k, b in td.EDGE_KINDS]
    + [("test_confident_rows_match_plain_pytorch", dict(cause=c, kind=k, beta=b))
       for c, k, b in td.CONFIDENT_CASES]
    + [("test_jsd_mixture_with_subnormal_mass", dict(beta=b, role=r, offset=o))
       for b in (0.1, 0.5, 0.9) for r in ("student", "teacher") for o in (-103.0, -103.5)]
    + [("test_neg_inf_columns", dict(kind=k, beta=b, softcap=c))
       for k, b in td.EDGE_KINDS for c in (None, 4.0)]
)


def _suite_id(case: tuple[str, dict]) -> str:
    name, params = case
    return "-".join([name.removeprefix("test_")] + [str(v) for v in params.values()])


@pytest.mark.parametrize("case", _SUITE, ids=[_suite_id(c) for c in _SUITE])
def test_host_row_step_suite(seed, in_row_step_suite, case):
    """The kernel's row code passes the same oracle checks as the PyTorch and Triton steps."""
    name, params = case
    test = getattr(td, name)
    if "seed" in inspect.signature(test).parameters:
        params = {"seed": seed, **params}
    test(step=HOST_STEP, **params)


# --- what only the CUDA port has ---------------------------------------------------------------

IGNORE = td.IGNORE
SENTINEL = 1234.5


def _on_cpu_block(seed: int, rows: int, vocab: int, dtype: torch.dtype):
    """td._block on the CPU, rounded to `dtype` (the oracle sees the rounded values)."""
    s, t, labels, coef = td._block(seed, rows, vocab, masked_rows=(1,))
    to = lambda x: x.cpu().to(dtype)  # noqa: E731
    return to(s), to(t), labels.cpu(), coef.cpu()


def _placed(x: torch.Tensor, layout: str, fill: float = SENTINEL) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """x copied into a larger buffer: (view with x's values, the whole buffer).
    contiguous: rows back to back; offset: the block starts 1 element past a 16-byte
    boundary; padded: row stride V + 3 (every row a different alignment phase)."""
    rows, vocab = x.shape
    if layout == "contiguous":
        buf = torch.full((rows * vocab + 8,), fill, dtype=x.dtype)
        view = buf[:rows * vocab].view(rows, vocab)
    elif layout == "offset":
        buf = torch.full((rows * vocab + 8,), fill, dtype=x.dtype)
        view = buf[1:1 + rows * vocab].view(rows, vocab)
    else:
        buf = torch.full((rows, vocab + 3), fill, dtype=x.dtype)
        view = buf[:, :vocab]
    view.copy_(x)
    return view, buf


def _stats_buffer(rows: int) -> torch.Tensor:
    return torch.full((rows, NUM_STATS), math.nan)


LAYOUTS = ["contiguous", "offset", "padded"]


@pytest.mark.parametrize("threads", [3, 32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("vocab", [1, 7, 37, 1013])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_host_packs_heads_and_tails(seed, host_step, dtype, vocab, layout, threads):
    """Odd vocabularies and row starts off the 16-byte grid: the scalar head, the packs and the
    scalar tail together cover each row exactly once. bf16 rows write an fp32 gradient into a
    separate buffer; nothing outside the block is touched."""
    opts = td._opts("jsd", 0.3, tau_s=0.9, tau_t=1.1, clip=0.05)
    s, t, labels, coef = _on_cpu_block(seed, 5, vocab, dtype)
    s_view, s_buf = _placed(s, layout)
    t_view, t_buf = _placed(t, layout)
    stats = _stats_buffer(5)
    if dtype == torch.float32:
        host_step(s_view, t_view, labels, coef, stats, opts, True, threads=threads)
        grad, g_buf = s_view, s_buf
    else:
        grad, g_buf = _placed(torch.full((5, vocab), math.nan), layout)
        host_step(s_view, t_view, labels, coef, stats, opts, True, grad=grad, threads=threads)
        assert torch.equal(s_view, s), "bf16 logits must only be read"
    assert torch.equal(t_view, t), "the teacher was modified"
    for buf, view in ((s_buf, s_view), (t_buf, t_view), (g_buf, grad)):
        outside = torch.ones_like(buf, dtype=torch.bool)
        outside.view(-1)[_flat_index(buf, view)] = False
        assert (buf[outside] == SENTINEL).all(), "wrote outside the block"
    td._check(stats, grad, *td._expected(s.float(), t.float(), labels, coef, opts, "jsd"),
              labels)


def _flat_index(buf: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """Positions in buf's storage covered by `view`."""
    rows, vocab = view.shape
    start = view.storage_offset() - buf.storage_offset()
    idx = torch.arange(rows).unsqueeze(1) * view.stride(0) + torch.arange(vocab) + start
    return idx.reshape(-1)


@pytest.mark.parametrize("kind, beta", [("jsd", 0.5), ("forward_kl", 0.5), ("reverse_kl", 0.5),
                                        ("sampled", 0.5)])
def test_host_gradient_buffer_out_of_phase(seed, host_step, kind, beta):
    """fp32 logits with a separate gradient buffer 4 bytes off their alignment phase: no
    common 16-byte grid, so every row runs scalar (and must still be right)."""
    opts = td._opts(kind, beta, softcap=5.0)
    s, t, labels, coef = _on_cpu_block(seed, 4, 203, torch.float32)
    grad, _ = _placed(torch.full((4, 203), math.nan), "offset")
    stats = _stats_buffer(4)
    host_step(s, t, labels, coef, stats, opts, True, grad=grad)
    td._check(stats, grad, *td._expected(s, t, labels, coef, opts, kind), labels)


@pytest.mark.parametrize("kind, beta", [("jsd", 0.7), ("reverse_kl", 0.5), ("sampled", 0.5)])
def test_host_bf16_gradient_in_place(seed, host_step, kind, beta):
    """bf16 logits, gradient written over them (csrc/divergence.h's contract): the fp32
    gradient rounded to nearest even, i.e. within half a bf16 ulp of the oracle (plus the
    fp32 error), and masked rows exactly 0."""
    opts = td._opts(kind, beta, tau_s=1.1, tau_t=1.1)
    s, t, labels, coef = _on_cpu_block(seed, 6, 4133, torch.bfloat16)
    stats = _stats_buffer(6)
    s_out = s.clone()
    host_step(s_out, t, labels, coef, stats, opts, True)
    exp_stats, exp_grad = td._expected(s.float(), t.float(), labels, coef, opts, kind)
    assert not stats.isnan().any() and torch.isfinite(s_out).all()
    scale = exp_grad.abs().max().item()
    torch.testing.assert_close(s_out.double(), exp_grad, rtol=2.0**-8, atol=2e-5 * scale)
    assert (s_out[labels == IGNORE] == 0).all()
    for i in range(NUM_STATS):
        assert_close(stats[:, i], exp_stats[:, i], scale=max(exp_stats[:, i].abs().max(), 1.0))


def test_host_row_threads_agree(seed, host_step):
    """One thread, a warp and a 256-thread block give the same row up to fp32 summation order
    (V = 20011: several passes of packs per lane in each configuration)."""
    opts = td._opts("jsd", 0.5, clip=0.05)
    s, t, labels, coef = _on_cpu_block(seed, 3, 20011, torch.float32)
    results = []
    for threads in (1, 32, 256):
        s_out, stats = s.clone(), _stats_buffer(3)
        host_step(s_out, t, labels, coef, stats, opts, True, threads=threads)
        results.append((stats, s_out))
    for stats, grad in results[1:]:
        torch.testing.assert_close(stats, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4,
                                   atol=1e-6 * grad.abs().max().item())
    td._check(*results[2], *td._expected(s, t, labels, coef, opts, "jsd"), labels)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "sampled"])
def test_host_without_grad_reads_only(seed, host_step, kind):
    """write_grad=False: the student block is left untouched (bit for bit) and the stats equal
    those of the gradient-writing call."""
    opts = td._opts(kind, 0.5, tau_s=0.8, tau_t=1.3)
    s, t, labels, coef = _on_cpu_block(seed, 5, 517, torch.float32)
    s_in, stats = s.clone(), _stats_buffer(5)
    host_step(s_in, t, labels, coef, stats, opts, False)
    assert torch.equal(s_in, s)
    stats_g = _stats_buffer(5)
    host_step(s.clone(), t, labels, coef, stats_g, opts, True)
    torch.testing.assert_close(stats, stats_g, rtol=1e-6, atol=1e-7)


def test_host_bf16_masked_rows_hold_garbage(seed, host_step):
    """bf16 masked rows full of NaN / inf are never read: zero stats and gradient."""
    opts = td._opts("reverse_kl", 0.5)
    s, t, labels, coef = _on_cpu_block(seed, 4, 300, torch.bfloat16)
    s[1], t[1] = math.nan, math.inf
    grad, stats = torch.full((4, 300), math.nan), _stats_buffer(4)
    host_step(s, t, labels, coef, stats, opts, True, grad=grad)
    assert (stats[1] == 0).all() and (grad[1] == 0).all()
    assert torch.isfinite(stats).all() and torch.isfinite(grad).all()


# --- the compiles (last: they finish in the background while the harness tests run) -----


@pytest.mark.slow
@requires_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=[p.name for p in CU_SOURCES])
def test_cuda_source_compiles(jobs, source):
    _no_warnings(jobs[f"nvcc:{source.name}"].check())


@pytest.mark.slow
@requires_cxx
@pytest.mark.parametrize("source", TORCH_SOURCES, ids=[p.name for p in TORCH_SOURCES])
def test_torch_wrapper_is_sound(jobs, source):
    job = jobs[f"torch:{source.name}"]
    if job is None:
        pytest.skip("the CUDA headers (cuda_runtime_api.h) were not found")
    _no_warnings(job.check())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
