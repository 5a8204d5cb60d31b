"""The native row step (`ops/divergence_native.py`, csrc/cpu) against the float64 oracle.

test_divergence.py already runs every row-step case (fp32, small blocks) on the native step
too; this file adds what only the compiled kernel has: bf16 blocks, blocks large and odd enough
to be split across threads and to end inside a vector (37 x 1013), the baseline (non-AVX2)
build, the registered operator (opcheck), and the loss end to end with backend="native".
Every test here skips, with the reason the extension is missing, if it is not built; on CI
(OPSD_REQUIRE_NATIVE=1, set by `make test`) a missing extension is a failure.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    HAS_NATIVE,
    NATIVE_MISSING,
    assert_close,
    compare_results,
    generator,
    make_fused_inputs,
    make_logits_inputs,
    randn,
    reference_divergence,
    reference_fused,
    run_divergence,
    run_fused,
    upstream_grad,
)
from test_divergence import IGNORE, KIND_IDS, KINDS, OPTIONS, _check, _expected, _opts
from test_divergence import _block as _device_block

from opsd_kernels._native import device_error
from opsd_kernels.divergence_options import KIND_CODES, RowOptions
from opsd_kernels.ops.divergence_native import divergence_rows_native_
from opsd_kernels.types import NUM_STATS, STAT_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
# The CPU kernel is tested on CPU tensors on every machine (GPU boxes included); the loss end to
# end runs on the test device (conftest.HAS_NATIVE).
CPU_MISSING = device_error(torch.device("cpu"))
requires_cpu_kernel = pytest.mark.skipif(CPU_MISSING is not None, reason=f"native: {CPU_MISSING}")
requires_native = pytest.mark.skipif(not HAS_NATIVE, reason=f"native: {NATIVE_MISSING}")
BF16_EPS = 2.0**-8  # bf16 rounding (unit roundoff of an 8-bit significand)


def _block(*args, **kwargs):
    return tuple(None if x is None else x.cpu() for x in _device_block(*args, **kwargs))


def _poisoned_stats(rows: int) -> torch.Tensor:
    return torch.full((rows, NUM_STATS), math.nan)


def test_native_is_built_where_required() -> None:
    """`make test` sets OPSD_REQUIRE_NATIVE=1: there the extension must build and load."""
    if os.environ.get("OPSD_REQUIRE_NATIVE") != "1":
        pytest.skip("OPSD_REQUIRE_NATIVE is not set")
    assert CPU_MISSING is None, f"the native extension is required here but unusable: {CPU_MISSING}"


def _run_native(s, t, labels, coef, opts: RowOptions, write_grad: bool = True):
    s_out, t_in, stats = s.clone(), t.clone(), _poisoned_stats(s.shape[0])
    divergence_rows_native_(s_out, t_in, labels, coef, stats, opts, write_grad)
    assert torch.equal(t_in.view(torch.int16) if t.dtype == torch.bfloat16 else t_in,
                       t.view(torch.int16) if t.dtype == torch.bfloat16 else t) or (
        t_in.isnan() == t.isnan()).all(), "the teacher was modified"
    return stats, s_out


def _check_bf16_grad(grad: torch.Tensor, exp_grad: torch.Tensor) -> None:
    """The gradient is computed in fp32 and rounded once to bf16."""
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    err = (grad.double() - exp_grad).abs()
    bound = BF16_EPS * exp_grad.abs() + 2e-5 * max(exp_grad.abs().max().item(), 1e-2)
    assert (err <= bound).all(), f"grad: max excess {(err - bound).max().item():.3e}"


# --- odd shapes: the parallel split and the vector tail -----------------------------------------

CASES = [
    pytest.param(kind, beta, opt, id=f"{kid}-{opt}")
    for (kind, beta), kid in zip(KINDS, KIND_IDS, strict=True)
    for opt in OPTIONS
    if not (kind == "sampled" and "clip" in opt)
]


@requires_cpu_kernel
@pytest.mark.parametrize("kind, beta, opt_name", CASES)
def test_odd_block_fp32(seed, kind, beta, opt_name):
    """37 rows x 1013 columns: rows split across threads unevenly, V not a multiple of any
    vector width; masked rows in both thread shares."""
    opts = _opts(kind, beta, **OPTIONS[opt_name])
    s, t, labels, coef = _block(seed, 37, 1013, std=5.0 if "clip" in opt_name else 2.0,
                                masked_rows=(0, 2, 20, 36))
    stats, grad = _run_native(s, t, labels, coef, opts)
    _check(stats, grad, *_expected(s, t, labels, coef, opts, kind), labels)


@requires_cpu_kernel
@pytest.mark.parametrize("kind, beta, opt_name", CASES)
def test_odd_block_bf16(seed, kind, beta, opt_name):
    """bf16 logits of both roles, read with fp32 accumulation: stats to the fp32 tolerance of
    the oracle on the same (bf16) numbers; the gradient rounded once to bf16."""
    opts = _opts(kind, beta, **OPTIONS[opt_name])
    s, t, labels, coef = _block(seed, 37, 1013, std=5.0 if "clip" in opt_name else 2.0,
                                masked_rows=(1, 30))
    s, t = s.bfloat16(), t.bfloat16()
    stats, grad = _run_native(s, t, labels, coef, opts)
    exp_stats, exp_grad = _expected(s, t, labels, coef, opts, kind)
    assert not stats.isnan().any(), "stats: some elements were not written"
    for i, name in enumerate(STAT_NAMES):
        assert_close(stats[:, i], exp_stats[:, i], scale=max(exp_stats[:, i].abs().max(), 1.0),
                     what=f"stat {name}")
    _check_bf16_grad(grad, exp_grad)
    masked = labels == IGNORE
    assert (stats[masked] == 0).all() and (grad[masked] == 0).all()


@requires_cpu_kernel
@pytest.mark.parametrize("s_dtype, t_dtype", [(torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_mixed_dtypes(seed, s_dtype, t_dtype):
    opts = _opts("jsd", 0.3, tau_s=0.9, tau_t=1.2, clip=0.05)
    s, t, labels, coef = _block(seed, 9, 515, std=4.0)
    s, t = s.to(s_dtype), t.to(t_dtype)
    stats, grad = _run_native(s, t, labels, coef, opts)
    exp_stats, exp_grad = _expected(s, t, labels, coef, opts, "jsd")
    for i, name in enumerate(STAT_NAMES):
        assert_close(stats[:, i], exp_stats[:, i], scale=max(exp_stats[:, i].abs().max(), 1.0),
                     what=f"stat {name}")
    if s_dtype == torch.bfloat16:
        _check_bf16_grad(grad, exp_grad)
    else:
        assert_close(grad, exp_grad, what="grad")


@requires_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("garbage", [math.nan, math.inf], ids=["nan", "inf"])
def test_masked_rows_with_garbage_are_never_read(seed, dtype, garbage):
    opts = _opts("reverse_kl", 0.5, softcap=4.0)
    s, t, labels, coef = _block(seed, 33, 300, masked_rows=(3, 17, 32))
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[[3, 17, 32]] = garbage
    t_bad[[3, 17, 32]] = garbage
    stats, grad = _run_native(s_bad.to(dtype), t_bad.to(dtype), labels, coef, opts)
    assert (stats[[3, 17, 32]] == 0).all() and (grad[[3, 17, 32]] == 0).all()
    assert torch.isfinite(stats).all() and torch.isfinite(grad.float()).all()


@requires_cpu_kernel
def test_long_rows_edge_values(seed):
    """A row longer than the flush interval of the kernel's sums, with -inf padding in the
    last, partial vector and logits near the exp underflow in both roles."""
    vocab = 32768 + 37
    s, t, labels, coef = _block(seed, 5, vocab, std=3.0, masked_rows=(1,))
    s[:, -21:] = -math.inf
    t[:, -21:] = -math.inf
    s[:, :50] -= 95.0  # e^(-95) relative to the maximum: subnormal-range probabilities
    t[:, 50:100] -= 95.0
    labels[labels >= vocab - 21] = 7
    for kind, beta in [("jsd", 0.5), ("forward_kl", 0.5), ("sampled", 0.5)]:
        opts = _opts(kind, beta)
        stats, grad = _run_native(s, t, labels, coef, opts)
        assert (grad[:, -21:] == 0).all()
        # The oracle without the -inf columns (autograd through them would give NaN).
        exp_stats, exp_grad = _expected(s[:, :-21], t[:, :-21], labels, coef, opts, kind)
        _check(stats, grad[:, :-21], exp_stats, exp_grad, labels)


@requires_cpu_kernel
def test_results_do_not_depend_on_the_thread_count(seed):
    """Each row is computed by one thread with the same code: bitwise identical results."""
    opts = _opts("jsd", 0.5, tau_s=1.1, tau_t=0.9)
    s, t, labels, coef = _block(seed, 41, 2049)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_native(s, t, labels, coef, opts)
        torch.set_num_threads(max(threads, 3))
        many = _run_native(s, t, labels, coef, opts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.slow
@requires_cpu_kernel
def test_every_kernel_build_agrees(tmp_path):
    """ATEN_CPU_CAPABILITY=default / avx2 makes the extension pick its baseline or AVX2 kernel,
    as it does for torch's own kernels: each build this CPU can run must agree with the one
    picked by default (AVX512 here when the CPU has it)."""
    code = textwrap.dedent("""
        import sys, torch
        from opsd_kernels import _native
        from opsd_kernels.ops.divergence_native import divergence_rows_native_
        from opsd_kernels.divergence_options import RowOptions
        assert _native.native_status() is None, _native.native_status()
        g = torch.Generator().manual_seed(0)
        s = torch.randn(13, 301, generator=g) * 3
        t = s + torch.randn(13, 301, generator=g)
        labels = torch.randint(0, 301, (13,), generator=g)
        labels[4] = -100
        coef = torch.rand(13, generator=g) + 0.5
        out = {"isa": _native._load()[0].cpu_isa()}
        for kind, clip, cap in [("jsd", 0.05, None), ("forward_kl", None, 3.0),
                                ("reverse_kl", None, None), ("sampled", None, 2.0)]:
            opts = RowOptions.make(kind, 0.4, 0.8, 1.3, clip, cap, -100)
            s_out, stats = s.clone(), torch.full((13, 7), float("nan"))
            divergence_rows_native_(s_out, t, labels, coef, stats, opts, True)
            out[kind] = (stats, s_out)
        torch.save(out, sys.argv[1])
    """)
    results = {}
    caps = ["default", None]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        caps.insert(1, "avx2")
    for cap in caps:
        path = tmp_path / f"native-{cap}.pt"
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if cap is not None:
            env["ATEN_CPU_CAPABILITY"] = cap
        proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[cap] = torch.load(path)
    assert results["default"]["isa"] == "DEFAULT"
    if "avx2" in results:
        assert results["avx2"]["isa"] == "AVX2"
    for cap in caps[:-1]:
        for kind in ("jsd", "forward_kl", "reverse_kl", "sampled"):
            for a, b in zip(results[cap][kind], results[None][kind], strict=True):
                assert not a.isnan().any()
                torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


@requires_cpu_kernel
@pytest.mark.parametrize("bad, match", [
    (dict(s_dtype=torch.float16), "float32 or bfloat16"),
    (dict(label=5000), "outside"),
    (dict(stats_cols=6), "stats must be"),
    (dict(coef_dtype=torch.float64), "coef must be"),
    (dict(t_cols=99), r"t must be \[4, 100\]"),
])
def test_argument_errors(bad, match):
    s = torch.randn(4, 100).to(bad.get("s_dtype", torch.float32))
    t = torch.randn(4, bad.get("t_cols", 100))
    labels = torch.tensor([1, 2, bad.get("label", 3), IGNORE])
    coef = torch.ones(4, dtype=bad.get("coef_dtype", torch.float32))
    stats = torch.empty(4, bad.get("stats_cols", NUM_STATS))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.opsd.divergence_rows_native_(s, t, labels, coef, stats, 2, 0.5, 1.0, 1.0,
                                               None, None, IGNORE, True)


# --- the registered operator --------------------------------------------------------------------

OPCHECK_CASES = {
    "jsd": ("jsd", 0.5, 1.0, 1.0, None, None, True, True, torch.float32),
    "fkl_no_labels_no_grad": ("forward_kl", 0.5, 0.8, 1.2, None, None, False, False,
                              torch.float32),
    "rkl_clip_softcap": ("reverse_kl", 0.5, 1.1, 1.1, 0.05, 3.0, True, True, torch.float32),
    "sampled_bf16": ("sampled", 0.5, 1.0, 1.0, None, None, True, True, torch.bfloat16),
}


@requires_cpu_kernel
@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_registered_op(name):
    kind, beta, tau_s, tau_t, clip, cap, with_labels, write_grad, dtype = OPCHECK_CASES[name]
    gen = generator(3)
    s = randn(gen, 6, 37).to(dtype)
    t = randn(gen, 6, 37).to(dtype)
    labels = torch.tensor([1, IGNORE, 5, 36, 0, 9]) if with_labels else None
    coef = torch.rand(6, generator=gen)
    stats = torch.empty(6, NUM_STATS)
    opts = RowOptions.make(kind, beta, tau_s, tau_t, clip, cap, IGNORE)
    args = (s, t, labels, coef, stats, KIND_CODES[opts.kind], opts.beta, opts.inv_tau_s,
            opts.inv_tau_t, opts.clip, opts.softcap, opts.ignore_index, write_grad)
    torch.library.opcheck(torch.ops.opsd.divergence_rows_native_.default, args,
                          raise_exception=True)


# --- the loss end to end ------------------------------------------------------------------------

E2E_OPTIONS = {
    "jsd": dict(divergence="jsd", beta=0.5),
    "forward_kl_temperatures": dict(divergence="forward_kl", temperature=0.7,
                                    teacher_temperature=1.3),
    "reverse_kl_clip_softcap": dict(divergence="reverse_kl", clip=0.01, logit_softcap=5.0),
    "sampled": dict(divergence="sampled"),
    "jsd_top_k_tail": dict(divergence="jsd", beta=0.3, top_k=9, tail_bucket=True),
    "opsd_clip": dict(divergence="jsd", beta=0.0, temperature=1.1, clip=0.05),
}


@requires_native
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(E2E_OPTIONS))
def test_fused_linear_divergence_native(seed, name, reduction):
    """Loss, every gradient (hidden, trainable head, bias) and every stat vs the oracle."""
    inp = make_fused_inputs(seed, token_shape=(5, 9), vocab=301, bias=True,
                            logit_std=6.0 if "clip" in name else 2.0)
    up = upstream_grad(seed, reduction, inp.token_shape)
    options = E2E_OPTIONS[name]
    ours = run_fused(inp, backend="native", reduction=reduction, upstream=up, chunk_size=8,
                     **options)
    ref = reference_fused(inp, reduction=reduction, upstream=up, **options)
    compare_results(ours, ref)


@requires_native
def test_divergence_from_bf16_logits_native(seed):
    """`divergence` on bf16 logits: forward values to fp32 accuracy, the gradient within the
    flash-attention rule of plain bf16 PyTorch."""
    inp = make_logits_inputs(seed, token_shape=(4, 9), vocab=257, dtype=torch.bfloat16)
    up = upstream_grad(seed, "mean", (4, 9))
    options = dict(divergence="jsd", beta=0.7, temperature=0.9)
    ours = run_divergence(inp, backend="native", upstream=up, chunk_size=7, **options)
    ref = reference_divergence(inp, upstream=up, **options)
    base = reference_divergence(inp, logits_dtype=torch.bfloat16, math_dtype=torch.float32,
                                upstream=up, **options)
    compare_results(ours, ref, torch.bfloat16, baseline=base)
