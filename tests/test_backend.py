"""How the package chooses a backend (`resolve_backend`, OPSD_BACKEND, what each function then
runs) and loads and reports the native one (`opsd_kernels._native`, `env_report()`): the
wording when the extension is missing or stale, whether or not it is built on this machine
(a missing one is simulated). Fresh-interpreter checks: test_package.py."""

from __future__ import annotations

import importlib.util
import os
import re
from types import SimpleNamespace

import pytest
import torch

import opsd_kernels
from opsd_kernels import (
    _backend,
    _native,
    divergence,
    divergence_driver,
    fused_linear_divergence,
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


# --- backend choice -----------------------------------------------------------------------------

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNNABLE = HAS_TRITON and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
N, H, V = 5, 8, 37


def _randn(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _tiny_linear() -> tuple:
    return _randn(N, H, seed=1, grad=True), _randn(V, H, seed=2, grad=True), _randn(N, H, seed=3)


def _call(fn_name: str, backend: str, **kwargs) -> torch.Tensor:
    if fn_name == "fused_linear_divergence":
        return fused_linear_divergence(*_tiny_linear(), backend=backend, **kwargs)
    return divergence(_randn(N, V, seed=11, grad=True), _randn(N, V, seed=12), backend=backend,
                      **kwargs)


@pytest.fixture
def used_backends(monkeypatch) -> list[str]:
    """Records the backend of every row step the chunked driver asks for."""
    seen: list[str] = []
    real = divergence_driver.row_step_for

    def spy(backend: str):
        seen.append(backend)
        return real(backend)

    monkeypatch.setattr(divergence_driver, "row_step_for", spy)
    return seen


FUNCTIONS = ["fused_linear_divergence", "divergence"]


NATIVE_BUILT = _backend.native_status() is None


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_auto_on_cpu_is_native_when_built_else_torch(fn_name: str, monkeypatch,
                                                     used_backends) -> None:
    monkeypatch.delenv("OPSD_BACKEND", raising=False)
    expected = "native" if NATIVE_BUILT else "torch"
    assert _backend.resolve_backend("auto", torch.device("cpu")) == expected
    auto = _call(fn_name, "auto")
    assert used_backends == [expected]
    torch.testing.assert_close(auto, _call(fn_name, "torch"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_auto_on_cpu_without_native_is_torch(fn_name: str, monkeypatch, used_backends) -> None:
    monkeypatch.delenv("OPSD_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_native_runs_on_cpu", lambda: False)
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"
    _call(fn_name, "auto")
    assert used_backends == ["torch"]


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_env_var_overrides_auto_only(fn_name: str, monkeypatch, used_backends) -> None:
    monkeypatch.setenv("OPSD_BACKEND", "torch")
    _call(fn_name, "auto")
    assert used_backends == ["torch"]
    monkeypatch.setenv("OPSD_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match=r"^backend: .*no-such-backend"):
        _call(fn_name, "auto")
    _call(fn_name, "torch")  # an explicit choice ignores the variable
    assert used_backends == ["torch", "torch"]
    monkeypatch.setenv("OPSD_BACKEND", "native")
    if NATIVE_BUILT:
        _call(fn_name, "auto")
        assert used_backends == ["torch", "torch", "native"]
    else:
        with pytest.raises(RuntimeError, match="native"):
            _call(fn_name, "auto")


@pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton not runnable here")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's -inf - -inf lanes
@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_env_var_selects_triton(fn_name: str, monkeypatch, used_backends) -> None:
    monkeypatch.setenv("OPSD_BACKEND", "triton")
    got = _call(fn_name, "auto")
    assert used_backends == ["triton"]
    torch.testing.assert_close(got, _call(fn_name, "torch"), atol=1e-5, rtol=1e-5)


def test_auto_on_cuda_device_prefers_triton_or_warns(monkeypatch) -> None:
    """No CUDA needed: resolve_backend only looks at the device type."""
    monkeypatch.delenv("OPSD_BACKEND", raising=False)
    cuda = torch.device("cuda", 0)
    if HAS_TRITON:
        assert _backend.resolve_backend("auto", cuda) == "triton"
    monkeypatch.setattr(_backend, "triton_status", lambda: "triton is broken here")
    with pytest.warns(UserWarning, match="falling back.*triton is broken here"):
        assert _backend.resolve_backend("auto", cuda) == "torch"
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_unknown_backend(fn_name: str) -> None:
    with pytest.raises(ValueError, match=r"^backend: .*'cuda'"):
        _call(fn_name, "cuda")


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_native_backend_without_the_extension_is_a_clear_error(fn_name: str,
                                                               monkeypatch) -> None:
    why = "the native extension opsd_kernels._C is not built (for this test)"
    monkeypatch.setattr(_native, "_load", lambda: (None, why))
    with pytest.raises(RuntimeError, match=r"backend='native' cannot run: .*not built"):
        _call(fn_name, "native")


def test_triton_on_cpu_without_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.resolve_backend("triton", torch.device("cpu"))
