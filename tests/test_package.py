"""The package as a whole, in fresh interpreters: what `import opsd_kernels` loads (never
Triton, the native extension, CUDA, transformers or TRL), that nothing on the loss path syncs
with the host, and a machine with neither Triton nor the extension.

One interpreter answers every lean-import question (`fresh_import`), one more plays the bare
machine: each costs a torch import, so the questions are batched, not spread over tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import opsd_kernels

PACKAGE_DIR = Path(opsd_kernels.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent


def _run_python(code: str, **env_changes: str | None) -> str:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


_FRESH_IMPORT = """
    import contextlib, io, json, sys
    import torch
    import opsd_kernels
    for public in opsd_kernels.__all__:  # the package loads them on first use
        getattr(opsd_kernels, public)
    out = {"loss_path_files": sorted(m.__file__ for name, m in sys.modules.items()
                                     if name.startswith("opsd_kernels")
                                     and getattr(m, "__file__", None))}
    import opsd_kernels.attention, opsd_kernels.prefix
    import opsd_kernels.integrations, opsd_kernels.integrations.trl
    out["modules"] = sorted(sys.modules)
    out["cuda_after_import"] = torch.cuda.is_initialized()
    out["env_report"] = opsd_kernels.env_report()
    out["cuda_after_env_report"] = torch.cuda.is_initialized()
    # backend='triton' on a CPU-only machine without the interpreter: a clear error.
    out["triton_on_cpu"] = []
    if not torch.cuda.is_available():
        h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)
        for call in (
            lambda: opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8),
                                                         backend="triton"),
            lambda: opsd_kernels.divergence(torch.randn(4, 11), torch.randn(4, 11),
                                            backend="triton"),
        ):
            try:
                call()
                out["triton_on_cpu"].append("ran")
            except RuntimeError as err:
                out["triton_on_cpu"].append(str(err))
    from opsd_kernels.cli import main
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        main(["env"])
    out["opsd_env"] = printed.getvalue()
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_import() -> dict:
    """What a fresh interpreter loads and reports, with Triton installed but not interpreted."""
    return json.loads(_run_python(_FRESH_IMPORT, TRITON_INTERPRET=None, OPSD_BACKEND=None))


def test_import_loads_no_optional_dependency(fresh_import: dict) -> None:
    modules = set(fresh_import["modules"])
    loaded = sorted(m for m in modules
                    if m.split(".")[0] in ("triton", "transformers", "trl")
                    or m in ("opsd_kernels._C", "opsd_kernels.ops.divergence",
                             "opsd_kernels.ops.attention"))
    assert not loaded, f"imported at import time: {loaded}"
    assert not fresh_import["cuda_after_import"], "import initialised CUDA"
    assert not fresh_import["cuda_after_env_report"], "env_report initialised CUDA"


def test_env_report_and_opsd_env_name_every_backend(fresh_import: dict) -> None:
    report = fresh_import["env_report"]
    assert set(report) >= {"torch", "triton", "native", "cuda"}, report
    native_built = opsd_kernels._backend.native_status() is None
    assert report["native"].startswith("built (CPU kernel " if native_built else "unusable: ")
    if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        assert report["triton"].startswith("unusable") and "TRITON_INTERPRET" in report["triton"]
    env_lines = fresh_import["opsd_env"].splitlines()
    native_line = next(line for line in env_lines if line.startswith("native"))
    assert report["native"] in native_line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs Triton for real")
def test_triton_on_cpu_without_the_interpreter_says_so(fresh_import: dict) -> None:
    errors = fresh_import["triton_on_cpu"]
    assert len(errors) == 2 and all("TRITON_INTERPRET" in err for err in errors), errors


def test_bare_machine_falls_back_and_explains() -> None:
    """Neither Triton nor the native extension importable: the package imports, env_report and
    `opsd env` say why, backend='auto' runs PyTorch, and the other backends raise the reason."""
    _run_python("""
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        sys.modules["opsd_kernels._C"] = None
        import torch
        import opsd_kernels
        from opsd_kernels import _backend
        report = opsd_kernels.env_report()
        assert report["triton"].startswith("unusable") and "not installed" in report["triton"]
        assert report["native"].startswith("unusable: the native extension opsd_kernels._C")
        assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"
        h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8)).backward()
        assert h.grad is not None and w.grad is not None
        for backend, reason in (("triton", "not installed"),
                                ("native", report["native"][len("unusable: "):])):
            try:
                opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8), backend=backend)
            except RuntimeError as err:
                assert reason in str(err), err
            else:
                raise AssertionError(f"backend={backend!r} ran without its dependency")
        assert sys.modules["triton"] is None, "something replaced the triton block"
        assert not torch.cuda.is_initialized()
        from opsd_kernels.cli import main
        main(["env"])
    """, TRITON_INTERPRET="1", OPSD_BACKEND=None)


# --- no host synchronisation on the loss path ---------------------------------------------------

_HOST_SYNC = re.compile(r"\.(item|tolist|cpu|numpy)\(\)|bool\([^()]*\.(all|any)\(\)\)")
# Reads that run on CPU tensors only, where they cost no sync: the label range check (on a
# device it uses _assert_async) and the fused CPU attention path's group ids and prefix lengths.
_CPU_ONLY_READS = {
    "opsd_kernels/_validate.py": ["bool(in_range.all())"],
    "opsd_kernels/ops/attention_torch.py": ["lengths = prefix_lengths.tolist()",
                                            "for row, g in enumerate(group_index.tolist()):"],
}


def _host_syncs(path: Path) -> list[str]:
    found = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if _HOST_SYNC.search(line.split("#", 1)[0]):
            found.append(f"{path.relative_to(REPO_ROOT)}:{lineno}: {line.strip()}")
    return found


def test_no_host_sync_calls_on_the_loss_path(fresh_import: dict) -> None:
    """The modules the public names load, plus the kernels (loaded lazily), call
    no Tensor -> Python conversion but the CPU-only reads listed above. Modules off the loss
    path (demo, CLI, trainer) may sync for printing and logging."""
    files = {Path(f) for f in fresh_import["loss_path_files"]}
    files |= set((PACKAGE_DIR / "ops").glob("*.py"))
    assert PACKAGE_DIR / "losses.py" in files and PACKAGE_DIR / "divergence_driver.py" in files
    found = [hit for path in sorted(files) for hit in _host_syncs(path)]
    for path, reads in _CPU_ONLY_READS.items():
        for code in reads:
            hits = [hit for hit in found if hit.startswith(path) and code in hit]
            # A listed read that is gone must leave the list too, or it would excuse a new one.
            assert len(hits) == 1, f"{path}: expected the CPU-only read {code!r} once: {hits}"
            found.remove(hits[0])
    assert not found, "host syncs on the loss path:\n" + "\n".join(found)
