"""How the package loads and reports the native backend (`opsd_kernels._native`,
`env_report()`): the wording when the extension is missing or stale, whether or not it is built
on this machine (a missing one is simulated), its constants against Python's. Fresh-interpreter
checks: test_package.py; the backend choice itself: test_backend.py and test_losses_backend.py."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

import opsd_kernels
from opsd_kernels import (
    _backend,
    _native,
)
from opsd_kernels.divergence_options import KIND_NAMES
from opsd_kernels.types import STAT_NAMES, DivergenceStats

MISSING = _native.native_status()
requires_native = pytest.mark.skipif(MISSING is not None, reason=f"native: {MISSING}")


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


@requires_native
def test_native_constants_are_pythons() -> None:
    """The kind codes and stats columns csrc/divergence_options.h defines are the Python ones."""
    module = _native._load()[0]
    assert tuple(module.kind_names) == KIND_NAMES
    assert tuple(module.stat_names) == STAT_NAMES == DivergenceStats._fields
    assert _native._constants_error(module) is None


@pytest.mark.parametrize("name", ["kind_names", "stat_names"])
def test_a_build_with_other_constants_is_refused(name: str) -> None:
    swapped = {"kind_names": KIND_NAMES, "stat_names": STAT_NAMES}
    swapped[name] = (swapped[name][1], swapped[name][0], *swapped[name][2:])
    why = _native._constants_error(SimpleNamespace(**swapped))
    assert why is not None and f"was built with {name}" in why and "rebuild it" in why


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
