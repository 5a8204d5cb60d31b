"""The one place that decides which backend runs: triton, native or torch.

Importing this module touches neither CUDA nor Triton; availability is probed lazily.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from opsd_kernels import _native
from opsd_kernels.types import BACKENDS


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton; a module constant, so torch.compile traces the
# backend choice without probing packages inside the graph.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_status() -> str | None:
    """None when Triton kernels can run somewhere here, else why not."""
    if not _TRITON_FOUND:
        return "the triton package is not installed (pip install triton)"
    return None


def native_status() -> str | None:
    """None when the compiled extension opsd_kernels._C loads, else why not."""
    return _native.native_status()


def _native_runs_on_cpu() -> bool:
    return _native.device_error(torch.device("cpu")) is None


# The mark torch.compiler.assume_constant_result sets (torch marks its own justknobs_check the
# same way), set by hand because that function imports torch._dynamo, and with it Triton, at
# package import. torch.compile then calls this once and bakes in the answer instead of
# tracing the extension's import.
_native_runs_on_cpu._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _triton_error(device: torch.device) -> str | None:
    missing = triton_status()
    if missing is not None:
        return missing
    if device.type == "cuda" or triton_interpreted():
        return None
    return (f"Triton kernels need a CUDA device (tensors are on {device}); on CPU they run only "
            "under the interpreter: set TRITON_INTERPRET=1 before importing opsd_kernels")


KERNEL_BACKENDS: tuple[str, ...] = tuple(b for b in BACKENDS if b != "auto")


def resolve_backend(backend: str, device: torch.device,
                    available: tuple[str, ...] = KERNEL_BACKENDS, op: str = "the divergence ops",
                    stacklevel: int = 3) -> str:
    """Turn the user's choice into the backend that will run on `device`, or raise.

    `available` lists the backends `op` has kernels for (always "torch"; every op of the
    divergence stack has all three, shared-prefix attention has no native kernel). "auto" takes
    OPSD_BACKEND when it is set to one of them; the variable is process-wide, so a backend the
    op lacks (native for attention) leaves the op on its automatic choice. The automatic choice:
    the native kernels on CPU when built, else PyTorch; Triton on CUDA. On an accelerator where
    Triton cannot run (or on one without kernels here) it falls back to PyTorch with a warning:
    the slow path is never picked silently. An explicit
    choice that cannot run here raises RuntimeError naming the reason. `stacklevel` points the
    fallback warning at the user's call.
    """
    choices = ("auto", *available)
    lacking = "" if backend not in BACKENDS else f" ({op} has no {backend} kernel)"
    if backend not in choices:
        raise ValueError(f"backend: expected one of {choices}, got {backend!r}{lacking}")
    choice = backend
    if backend == "auto":
        env = os.environ.get("OPSD_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"backend: OPSD_BACKEND={env!r} is not one of {BACKENDS}")
        choice = env if env in available else "auto"
    if choice == "auto":
        return _automatic(device, available, op, stacklevel)
    if choice == "triton":
        why = _triton_error(device)
        if why is not None:
            raise RuntimeError(f"backend='triton' cannot run: {why}")
    if choice == "native":
        why = _native.device_error(device)
        if why is not None:
            raise RuntimeError(f"backend='native' cannot run: {why}")
    return choice


def _automatic(device: torch.device, available: tuple[str, ...], op: str,
               stacklevel: int) -> str:
    if device.type in ("cpu", "meta"):
        # On CPU the native row step is several times faster than the PyTorch one
        # (bench/bench_native.py); without the extension, PyTorch is the fallback.
        native = "native" in available and device.type == "cpu" and _native_runs_on_cpu()
        return "native" if native else "torch"
    if device.type != "cuda":
        why = f"no kernel of this package runs on {device.type} devices"
    elif "triton" not in available:
        why = f"{op} has no Triton kernel"
    else:
        why = _triton_error(device)
        if why is None:
            return "triton"
    warnings.warn(f"opsd_kernels: falling back to the PyTorch backend for {op} on {device}: "
                  f"{why}", stacklevel=stacklevel + 1)  # + 1: this function's own frame
    return "torch"


def env_report() -> dict[str, str]:
    """Which backends are usable here, and why the others are not."""
    cuda = torch.cuda.is_available()
    report = {"torch": f"usable (torch {torch.__version__})"}
    why = triton_status()
    if why is None:
        try:
            importlib.import_module("triton")
        except ImportError as err:
            why = f"the triton package does not import ({err})"
    if why is None and not cuda and not triton_interpreted():
        why = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    report["triton"] = "usable" if why is None else f"unusable: {why}"
    why = native_status()
    report["native"] = f"built ({_native.native_summary()})" if why is None else f"unusable: {why}"
    report["cuda"] = torch.cuda.get_device_name() if cuda else "no CUDA device"
    return report
