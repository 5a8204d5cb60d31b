"""How the package loads, reports and chooses the native backend: `env_report()`, `opsd env`,
`resolve_backend`, and the wording when the extension is missing, whether or not it is built
on this machine (a missing one is simulated)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import opsd_kernels
from opsd_kernels import _backend, _native

REPO_ROOT = Path(__file__).resolve().parents[1]
MISSING = _native.native_status()
requires_native = pytest.mark.skipif(MISSING is not None, reason=f"native: {MISSING}")


def _python(code: str, **env_changes: str | None) -> str:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@requires_native
def test_env_report_says_built_and_which_kernels() -> None:
    report = opsd_kernels.env_report()["native"]
    pattern = r"built \(CPU kernel (AVX512|AVX2|DEFAULT), (no )?CUDA kernels\)"
    assert re.fullmatch(pattern, report), report


def test_env_report_says_why_not(monkeypatch) -> None:
    why = "the native extension opsd_kernels._C is not built: setup.py said: no compiler"
    monkeypatch.setattr(_native, "_load", lambda: (None, why))
    assert opsd_kernels.env_report()["native"] == f"unusable: {why}"


def test_missing_reason_quotes_the_build_note(tmp_path, monkeypatch) -> None:
    note = tmp_path / "_native_build.txt"
    note.write_text("CMake configure failed (cmake -S /src ...):\nCMake Error: no CXX compiler\n")
    monkeypatch.setattr(_native, "_BUILD_NOTE", note)
    why = _native._missing_reason(ModuleNotFoundError("No module named 'opsd_kernels._C'"))
    assert why == ("the native extension opsd_kernels._C is not built: setup.py said: CMake "
                   "configure failed (cmake -S /src ...):")


def test_missing_reason_without_a_note_says_how_to_build(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_native, "_BUILD_NOTE", tmp_path / "absent.txt")
    why = _native._missing_reason(ModuleNotFoundError("No module named 'opsd_kernels._C'"))
    assert why.startswith("the native extension opsd_kernels._C is not built (No module named")
    assert "pip install --no-build-isolation -e ." in why


def test_version_mismatch_is_reported() -> None:
    assert _native._version_error("2.13.0", "2.13.1+cpu") is None
    why = _native._version_error("2.12.0", "2.13.0+cu128")
    assert why is not None and "built against torch 2.12.0, this is torch 2.13.0" in why


def test_without_the_extension_everything_falls_back() -> None:
    """A machine where opsd_kernels._C cannot be imported: the package imports, env_report and
    `opsd env` say why, backend='auto' runs PyTorch and backend='native' raises that reason."""
    out = _python("""
        import sys
        sys.modules["opsd_kernels._C"] = None  # `import opsd_kernels._C` now fails
        import torch
        import opsd_kernels
        from opsd_kernels import _backend
        report = opsd_kernels.env_report()["native"]
        assert report.startswith("unusable: the native extension opsd_kernels._C"), report
        assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"
        h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)
        opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8)).backward()
        try:
            opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8), backend="native")
        except RuntimeError as err:
            assert str(err) == "backend='native' cannot run: " + report[len("unusable: "):], err
        else:
            raise AssertionError("backend='native' ran without the extension")
        from opsd_kernels.cli import main
        main(["env"])
    """, OPSD_BACKEND=None)
    native_line = next(ln for ln in out.splitlines() if ln.startswith("native"))
    assert "unusable: the native extension opsd_kernels._C" in native_line


def test_import_does_not_load_the_extension() -> None:
    out = _python("""
        import sys
        import opsd_kernels
        print("opsd_kernels._C" in sys.modules)
    """)
    assert out.strip() == "False"


def test_cli_env_reports_native() -> None:
    out = _python("from opsd_kernels.cli import main; main(['env'])", OPSD_BACKEND=None)
    line = next(ln for ln in out.splitlines() if ln.startswith("native"))
    expected = "built (CPU kernel" if MISSING is None else "unusable:"
    assert expected in line, out


@requires_native
def test_native_on_a_device_without_kernels_is_a_clear_error() -> None:
    if _native._load()[0].has_cuda:
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match="no kernels for cuda tensors"):
        _backend.resolve_backend("native", torch.device("cuda", 0))
    assert not torch.cuda.is_initialized()


@requires_native
def test_auto_backend_traces_under_torch_compile(monkeypatch) -> None:
    """backend='auto' resolves to native on CPU inside a fullgraph torch.compile: the
    availability probe is a traced constant, not an import in the graph."""
    monkeypatch.delenv("OPSD_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w, h_t = torch.randn(37, 8, generator=g), torch.randn(6, 8, generator=g)
    labels = torch.tensor([1, -100, 5, 36, 0, 9])

    def loss_fn(h, backend):
        return opsd_kernels.fused_linear_divergence(h, w, h_t, labels=labels, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(h, "auto")
    (grad,) = torch.autograd.grad(got, h)
    want = loss_fn(h, "torch")
    (want_grad,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "native"
