"""What the public losses run for each `backend` and OPSD_BACKEND value (the row step the
chunked driver is asked for), on CPU and a simulated CUDA device. The resolver alone:
test_backend.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from opsd_kernels import (
    _backend,
    _native,
    divergence,
    divergence_driver,
    fused_linear_divergence,
)

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
