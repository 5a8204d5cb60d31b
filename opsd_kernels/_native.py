"""The loader of the compiled extension opsd_kernels._C (csrc/, python/bindings.cpp).

The extension is optional. It is imported on first use, never by `import opsd_kernels`, and a
failure is recorded rather than raised: `native_status()` says why it is missing (quoting
setup.py's note when the build itself failed), which `env_report()` / `opsd env` print.
Loading it registers the operator `opsd::divergence_rows_native_` (C++) and, here, its fake
kernel, so torch.compile and torch.library.opcheck can trace it.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from types import ModuleType

import torch

from opsd_kernels.divergence_options import KIND_NAMES
from opsd_kernels.types import STAT_NAMES

_MODULE = "opsd_kernels._C"
_OP = "opsd::divergence_rows_native_"
# Written by setup.py when it could not build the extension (absent after a good build).
_BUILD_NOTE = Path(__file__).with_name("_native_build.txt")
_HOW = "build it with `pip install --no-build-isolation -e .` (make test does; see setup.py)"


def _missing_reason(err: ImportError) -> str:
    if _BUILD_NOTE.exists():
        note = _BUILD_NOTE.read_text().strip().splitlines()
        detail = note[0] if note else "no reason recorded"
        return f"the native extension {_MODULE} is not built: setup.py said: {detail}"
    return f"the native extension {_MODULE} is not built ({err}); {_HOW}"


def _fake_row_step(s, t, labels, coef, stats, kind, beta, inv_tau_s, inv_tau_t, clip, softcap,
                   ignore_index, write_grad) -> None:
    # The op only writes into s and stats: nothing to allocate, no metadata to change.
    return None


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(_MODULE)
    except ModuleNotFoundError as err:
        if err.name != _MODULE:
            return None, f"{_MODULE} needs a module that is missing ({err})"
        return None, _missing_reason(err)
    except Exception as err:  # e.g. undefined symbols after a torch upgrade
        return None, (f"{_MODULE} failed to load ({type(err).__name__}: {err}); rebuild it: "
                      f"{_HOW}")
    why = _version_error(module.torch_version, torch.__version__) or _constants_error(module)
    if why is not None:
        return None, why
    torch.library.register_fake(_OP)(_fake_row_step)
    return module, None


def _version_error(built: str, running: str) -> str | None:
    # torch's C++ ABI is only stable within a minor release.
    running = running.split("+")[0]
    if built.split(".")[:2] == running.split(".")[:2]:
        return None
    return f"{_MODULE} was built against torch {built}, this is torch {running}; rebuild it: {_HOW}"


def _constants_error(module: ModuleType) -> str | None:
    # The kernels index kinds and stats columns by the numbers of csrc/divergence_options.h; a
    # build whose order differs from Python's would silently mislabel every stat.
    built = {"kind_names": tuple(module.kind_names), "stat_names": tuple(module.stat_names)}
    here = {"kind_names": KIND_NAMES, "stat_names": STAT_NAMES}
    for name, value in built.items():
        if value != here[name]:
            return (f"{_MODULE} was built with {name} {value}, this package has {here[name]}; "
                    f"rebuild it: {_HOW}")
    return None


def native_status() -> str | None:
    """None when the extension is loaded and usable, else why not."""
    return _load()[1]


def native_summary() -> str:
    """What the extension offers here, for env_report (only call when it is usable)."""
    module = _load()[0]
    assert module is not None
    cuda = "CUDA kernels" if module.has_cuda else "no CUDA kernels"
    return f"CPU kernel {module.cpu_isa()}, {cuda}"


def device_error(device: torch.device) -> str | None:
    """None when the native row step can run on tensors of `device`, else why not."""
    module, why = _load()
    if module is None:
        return why
    if device.type == "cpu" or (device.type == "cuda" and module.has_cuda):
        return None
    return f"{_MODULE} has no kernels for {device.type} tensors (built without CUDA kernels)"
