"""Every Triton kernel of the package, lowered to sm_80 and sm_90 machine code without a GPU.

The interpreter (TRITON_INTERPRET=1, what the CPU suite runs) accepts code that a GPU build
rejects: a loop-carried variable that changes shape, a dtype that only numpy promotes, shared
memory past the chip's limit. `triton.compile(ASTSource(...), target=GPUTarget(...))` runs the
real pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas) on the CPU, so each variant a launcher can
produce is compiled here, with the launcher's own block sizes and warp counts, and its shared
memory is checked against the device limit.

`VARIANTS` is the one list: one entry per kernel (`*_kernel` in a module of opsd_kernels.ops),
each a function yielding that kernel's variants; test_triton_lowering.py fails when a kernel
has no entry. Run as a script it lowers them all, across worker processes, and writes a JSON
line listing every (variant, arch), then one line per lowering:

    python tests/triton_lowering.py OUT.jsonl [--workers N]
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import pkgutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# Shared memory a block may use (the opt-in maximum per block): A100 and H100/H200.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_MEMORY_LIMIT)


@dataclass(frozen=True)
class Variant:
    """One compile: a kernel of `module`, its signature and constexprs, the launch options."""

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int = 3
    archs: tuple[int, ...] = ARCHS
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{consts}; warps={self.num_warps}; {' '.join(self.tags)}]"


def _signature(arg_names: list[str], constexprs: dict[str, object],
               type_of: Callable[[str], str]) -> dict[str, str]:
    return {n: "constexpr" if n in constexprs else type_of(n) for n in arg_names}


# --- the divergence row kernel -------------------------------------------------------------------


def divergence_variants() -> Iterator[Variant]:
    """Every flag combination at the GPU launch configuration of a real vocabulary, on both
    archs (64-bit row strides for one of them); every smaller tile width the launcher can pick
    for a small vocabulary, with all flags on and all off, on sm_90."""
    from opsd_kernels.divergence_options import KIND_CODES
    from opsd_kernels.ops import divergence as D
    from opsd_kernels.types import NUM_STATS

    kernel = D.divergence_rows_kernel

    def variant(kind: int, labels: bool, clip: bool, softcap: bool, grad: bool, vocab: int,
                stride: str = "i32", archs: tuple[int, ...] = ARCHS) -> Variant:
        block_v, warps = D.launch_config(vocab, on_gpu=True)
        consts = dict(KIND=kind, HAS_LABELS=labels, HAS_CLIP=clip, HAS_SOFTCAP=softcap,
                      WRITE_GRAD=grad, NUM_STATS=NUM_STATS, BLOCK_V=block_v)

        def type_of(name: str) -> str:
            if name == "labels_ptr":
                return "*i64" if labels else "*fp32"  # the launcher passes coef when unlabelled
            if name.endswith("_ptr"):
                return "*fp32"
            if name.endswith("_stride"):
                return stride
            return "i32" if name in ("V", "ignore_index") else "fp32"

        return Variant("opsd_kernels.ops.divergence", kernel.__name__,
                       _signature(kernel.arg_names, consts, type_of), consts, warps, archs=archs,
                       tags=(f"V={vocab}", f"stride={stride}"))

    flags = list(itertools.product(sorted(KIND_CODES.values()), *[(False, True)] * 4))
    for i, combo in enumerate(flags):
        yield variant(*combo, vocab=128256, stride="i64" if i % 2 else "i32")
    for vocab in (2 ** k + 1 for k in range(12)):  # tile widths 2 .. 4096 (4097 -> 4096)
        for on in (False, True):
            yield variant(KIND_CODES["jsd"], on, on, on, on, vocab=vocab, archs=(90,))


# --- the shared-prefix attention kernels ---------------------------------------------------------

_ATTENTION_KERNELS = ("_fwd_prefix_kernel", "_fwd_suffix_kernel", "_bwd_dq_kernel",
                      "_bwd_suffix_dkdv_kernel", "_bwd_prefix_dkdv_kernel")
_FP32_BUFFERS = {"OP", "LSEP", "LSE", "DELTA"}
_IO_TENSORS = {"Q", "K", "V", "PK", "PV", "OUT", "DO", "DQ", "DK", "DV", "DPK", "DPV"}
_TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def attention_variants(kernel_name: str) -> Callable[[], Iterator[Variant]]:
    """Every configuration `_config` gives a GPU launch: each tile width of the head dim (16 ..
    MAX_HEAD_DIM) in bf16 and fp32 (different tiles and dot precision), fp16 at D = 128. The
    widest heads (most shared memory) on both archs, the rest on sm_90."""

    def variants() -> Iterator[Variant]:
        import torch

        from opsd_kernels.ops import attention as A

        kernel = getattr(A, kernel_name)
        phase = "fwd" if "fwd" in kernel_name else "bwd"
        heads = [2 ** k for k in range(4, A.MAX_HEAD_DIM.bit_length())]
        cases = [(dt, d) for dt in (torch.bfloat16, torch.float32) for d in heads]
        cases.append((torch.float16, 128))
        for dtype, head_dim in cases:
            cfg = A._config(head_dim, dtype, torch.device("cuda"))
            block_m, block_n = cfg[phase]
            consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["block_d"],
                          PRECISION=cfg["precision"])
            io = "*" + _TRITON_DTYPE[str(dtype).removeprefix("torch.")]

            def type_of(name: str, io: str = io) -> str:
                if name.endswith("_ptr"):
                    return "*i64"
                if name in _FP32_BUFFERS:
                    return "*fp32"
                if name in _IO_TENSORS:
                    return io
                return "fp32" if "scale" in name else "i32"

            yield Variant("opsd_kernels.ops.attention", kernel_name,
                          _signature(kernel.arg_names, consts, type_of), consts, cfg["warps"],
                          cfg["stages"], archs=ARCHS if head_dim >= 128 else (90,),
                          tags=(f"D={head_dim}", io[1:]))

    return variants


VARIANTS: dict[str, Callable[[], Iterator[Variant]]] = {
    "divergence_rows_kernel": divergence_variants,
    **{name: attention_variants(name) for name in _ATTENTION_KERNELS},
}


def package_kernels() -> dict[str, str]:
    """{kernel name: module} of every `*_kernel` Triton function under opsd_kernels.ops."""
    from triton.runtime.jit import KernelInterface

    import opsd_kernels.ops as ops

    found = {}
    for info in pkgutil.iter_modules(ops.__path__, ops.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            # KernelInterface: a JITFunction, or the InterpretedFunction TRITON_INTERPRET=1 makes.
            if isinstance(obj, KernelInterface) and name.endswith("_kernel"):
                found[name] = info.name
    return found


def all_variants() -> list[Variant]:
    return [v for make in VARIANTS.values() for v in make()]


# --- lowering ------------------------------------------------------------------------------------


def lower(variant: Variant, arch: int) -> dict:
    """Compile one variant for one arch; the outcome as a JSON-able dict (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(variant.module), variant.kernel)
    result = {"variant": variant.label, "arch": arch, "ok": False}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(kernel, variant.signature, variant.constexprs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
    except Exception as err:  # noqa: BLE001 (every failure is reported, none stops the sweep)
        lines = traceback.format_exception_only(type(err), err)
        result["error"] = "".join(lines)[-1500:]
        return result
    shared = compiled.metadata.shared
    result.update(shared=shared, ok=shared <= SHARED_MEMORY_LIMIT[arch],
                  seconds=round(time.perf_counter() - start, 2))
    if not result["ok"]:
        limit = SHARED_MEMORY_LIMIT[arch]
        result["error"] = f"{shared} bytes of shared memory > sm_{arch}'s {limit}"
    return result


def _lower_all(jobs: list[tuple[Variant, int]]) -> list[dict]:
    return [lower(v, arch) for v, arch in jobs]


def lowering_env() -> dict[str, str]:
    """The environment of a lowering process: never the interpreter. Triton's own cache stays
    on: its key covers the kernel's source, the options, the target and Triton's version, and
    only successful compiles are stored, so a hit is a lowering that passed for this very
    code (the results keep its shared memory); a fresh machine compiles everything (minutes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    return env


@dataclass
class Job:
    """A lowering sweep running in the background; its results land in `out`."""

    process: subprocess.Popen
    out: Path


def start(work_dir: Path) -> Job:
    """Start the whole sweep in a niced background process writing under `work_dir`."""
    out = work_dir / "lowered.jsonl"
    process = subprocess.Popen(
        [sys.executable, __file__, str(out)], env=lowering_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None)
    return Job(process, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON-lines file: one line per (variant, arch)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the point is the real GPU pipeline")
    # Made here, not by the caller: launch configurations differ under the interpreter.
    jobs = [(v, arch) for v in all_variants() for arch in v.archs]
    # Attention kernels take seconds each and the divergence ones a fraction: deal them out
    # round-robin so the workers finish together.
    shards = [jobs[i::args.workers] for i in range(args.workers)]
    with ProcessPoolExecutor(args.workers) as pool, open(args.out, "w") as out:
        out.write(json.dumps({"expected": [[v.label, arch] for v, arch in jobs]}) + "\n")
        for results in pool.map(_lower_all, shards):
            for r in results:
                out.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

