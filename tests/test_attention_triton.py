"""The Triton launchers of shared-prefix attention (`opsd_kernels.ops.attention`) alone: every
output element written, every kernel lowered for sm_90. Their numerics through the op:
test_attention.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_cases import CASES, NAMES, make_inputs
from conftest import DEVICE, HAS_TRITON, assert_close, requires_triton

from opsd_kernels.attention import shared_prefix_attention_op

REPO_ROOT = Path(__file__).resolve().parents[1]
# The interpreter evaluates exp2 on lanes that tl.where then discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@requires_triton
def test_triton_writes_every_output_element(seed: int) -> None:
    """The launchers are handed NaN-poisoned outputs: every element must be written."""
    from opsd_kernels.ops.attention import (
        shared_prefix_attention_bwd_triton_,
        shared_prefix_attention_fwd_triton_,
    )

    case = CASES["gqa_ragged"]
    inp = make_inputs(seed, case)
    x = [t.float() for t in inp.tensors.values()]
    ints = (inp.group_index, inp.prefix_lengths, inp.suffix_lengths)
    scale = case.d**-0.5
    out, lse = (torch.full_like(x[0], math.nan),
                torch.full(x[0].shape[:3], math.nan, device=DEVICE))
    shared_prefix_attention_fwd_triton_(*x, *ints, scale, out, lse)
    assert not out.isnan().any() and not lse.isnan().any()
    grads = [torch.full_like(t, math.nan) for t in x]
    shared_prefix_attention_bwd_triton_(inp.grad_out.float(), *x, *ints, out, lse, scale, *grads)
    for name, g in zip(NAMES, grads, strict=True):
        assert not g.isnan().any(), f"grad of {name}: some elements were not written"
    want_out, want_lse = shared_prefix_attention_op(*x, *ints, scale, "torch")
    assert_close(out, want_out, what="out")
    assert_close(lse, want_lse, what="lse")


# The torch backend's two forms (fused on CPU, masked elsewhere), and Triton.
FORMS = ["torch-fused", "torch-masked"] + (["triton"] if HAS_TRITON else [])


_COMPILE_FOR_HOPPER = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import opsd_kernels.ops.attention as A

FP32_BUFFERS = {"OP", "LSEP", "LSE", "DELTA"}
TENSORS = {"Q", "K", "V", "PK", "PV", "OUT", "DO", "DQ", "DK", "DV", "DPK", "DPV"}
KERNELS = [A._fwd_prefix_kernel, A._fwd_suffix_kernel, A._bwd_dq_kernel,
           A._bwd_suffix_dkdv_kernel, A._bwd_prefix_dkdv_kernel]
for dtype, tname, d in ((torch.bfloat16, "bf16", 128), (torch.float32, "fp32", 48)):
    cfg = A._config(d, dtype, torch.device("cuda"))
    for kernel in KERNELS:
        bm, bn = cfg["fwd" if "fwd" in kernel.__name__ else "bwd"]
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["block_d"], PRECISION=cfg["precision"])
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*i64"
            elif name in FP32_BUFFERS:
                sig[name] = "*fp32"
            elif name in TENSORS:
                sig[name] = "*" + tname
            else:
                sig[name] = "fp32" if "scale" in name else "i32"
        compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg["warps"], num_stages=cfg["stages"]))
        assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, compiled.metadata.shared)
        print(tname, kernel.__name__, compiled.metadata.shared)
print("OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not usable here")
def test_kernels_compile_for_hopper(tmp_path: Path) -> None:
    """The interpreter accepts code that a GPU build rejects: lower every kernel to sm_90 code
    (no GPU needed) with the launch configurations of bf16 D = 128 and fp32 D = 48 (masked head
    dim, IEEE fp32 dots), within the H100's shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        proc.stdout[-4000:] + proc.stderr[-4000:])

