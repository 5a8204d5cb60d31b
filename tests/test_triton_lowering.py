"""Every Triton kernel lowers for sm_80 and sm_90 (no GPU needed): see triton_lowering.py.

The lowering runs in a background process that conftest.py starts as soon as this file's tests
are collected (niced, so it takes the cycles the rest of the suite leaves idle); the tests here
read its results.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import triton_lowering as lowering
from conftest import HAS_TRITON_PACKAGE, lowering_job

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAS_TRITON_PACKAGE, reason="triton is not installed")]


@pytest.fixture(scope="module")
def lowered(tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[set[tuple[str, int]], dict[tuple[str, int], dict]]:
    """(every (variant label, arch) of the sweep, {(variant label, arch): outcome})."""
    job = lowering_job(tmp_path_factory)
    try:
        _, stderr = job.process.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        job.process.kill()
        pytest.fail("the lowering sweep took over 30 minutes")
    assert job.process.returncode == 0, stderr[-4000:]
    header, *results = map(json.loads, job.out.read_text().splitlines())
    return ({tuple(e) for e in header["expected"]},
            {(r["variant"], r["arch"]): r for r in results})


def test_every_kernel_has_variants() -> None:
    """A kernel added to opsd_kernels.ops without an entry in VARIANTS fails here."""
    assert set(lowering.package_kernels()) == set(lowering.VARIANTS)


def test_every_divergence_flag_combination_is_lowered_on_both_archs() -> None:
    from opsd_kernels.divergence_options import KIND_CODES

    flags = ("KIND", "HAS_LABELS", "HAS_CLIP", "HAS_SOFTCAP", "WRITE_GRAD")
    for arch in lowering.ARCHS:
        seen = {tuple(v.constexprs[f] for f in flags) for v in lowering.divergence_variants()
                if arch in v.archs and v.constexprs["BLOCK_V"] == 4096}
        every = set(itertools.product(sorted(KIND_CODES.values()), *[(False, True)] * 4))
        assert seen == every, (arch, every - seen)


def test_every_variant_lowers_within_shared_memory(lowered) -> None:
    expected, lowered = lowered
    assert set(lowered) == expected
    for arch in lowering.ARCHS:  # every kernel on both archs
        assert {label.split("[")[0] for label, a in expected if a == arch} == set(
            lowering.VARIANTS)
    failed = [f"sm_{r['arch']} {r['variant']}: {r['error']}" for r in lowered.values()
              if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(lowered)} lowerings failed:\n" + "\n".join(
        failed[:8])


def test_a_kernel_the_interpreter_accepts_but_a_gpu_build_rejects_fails_here(
        tmp_path: Path) -> None:
    """The sweep's own check: a loop-carried variable that changes shape (the divergence
    kernel's old defect: a scalar re-assigned a tile in a loop) runs under the interpreter and
    must be reported by `lower`."""
    module = tmp_path / "bad_kernel_module.py"
    module.write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\n"
        "def bad_kernel(x_ptr, n, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    acc = tl.load(x_ptr)\n"
        "    for start in range(0, n, BLOCK):\n"
        "        acc = tl.load(x_ptr + start + offs)\n"
        "    tl.store(x_ptr + offs, acc)\n")
    script = (
        "import sys, json; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import triton_lowering as L\n"
        "v = L.Variant('bad_kernel_module', 'bad_kernel', {'x_ptr': '*fp32', 'n': 'i32',"
        " 'BLOCK': 'constexpr'}, {'BLOCK': 64}, 4)\n"
        "print(json.dumps(L.lower(v, 90)))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, env=lowering.lowering_env())
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["ok"] and "Loop-carried variable" in result["error"], result
