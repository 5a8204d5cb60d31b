"""`opsd_kernels._backend.resolve_backend`, the one backend choice of every op: the automatic
choice per device, OPSD_BACKEND, ops without some backend (shared-prefix attention has no
native kernel), and errors that name the argument. No CUDA is needed: the choice only looks at
the device type. The losses' own choice through the public functions: test_losses_backend.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from opsd_kernels import _backend
from opsd_kernels._backend import KERNEL_BACKENDS, resolve_backend

ATTENTION = ("triton", "torch")
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("OPSD_BACKEND", raising=False)


@pytest.fixture
def triton_works(monkeypatch):
    monkeypatch.setattr(_backend, "triton_status", lambda: None)


def test_every_op_runs_torch_on_cpu_without_the_native_kernels(monkeypatch) -> None:
    monkeypatch.setattr(_backend, "_native_runs_on_cpu", lambda: False)
    for available in (KERNEL_BACKENDS, ATTENTION, ("torch",)):
        assert resolve_backend("auto", CPU, available) == "torch"


def test_native_is_chosen_on_cpu_only_for_ops_that_have_it(monkeypatch) -> None:
    monkeypatch.setattr(_backend, "_native_runs_on_cpu", lambda: True)
    assert resolve_backend("auto", CPU) == "native"
    assert resolve_backend("auto", CPU, ATTENTION, "shared-prefix attention") == "torch"


def test_meta_tensors_run_torch_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for available in (KERNEL_BACKENDS, ATTENTION):
            assert resolve_backend("auto", torch.device("meta"), available) == "torch"


def test_cuda_picks_triton(triton_works) -> None:
    for available in (KERNEL_BACKENDS, ATTENTION):
        assert resolve_backend("auto", CUDA, available) == "triton"
    assert not torch.cuda.is_initialized()


def test_cuda_never_falls_back_silently(monkeypatch) -> None:
    """The PyTorch path on a GPU is slow: "auto" says so when it must take it, whether Triton
    is broken or the op has no Triton kernel."""
    monkeypatch.setattr(_backend, "triton_status", lambda: "triton is broken here")
    with pytest.warns(UserWarning, match="falling back.*for shared-prefix attention on cuda:0: "
                      "triton is broken here"):
        assert resolve_backend("auto", CUDA, ATTENTION, "shared-prefix attention") == "torch"
    monkeypatch.setattr(_backend, "triton_status", lambda: None)
    with pytest.warns(UserWarning, match="falling back.*some op has no Triton kernel"):
        assert resolve_backend("auto", CUDA, ("torch",), "some op") == "torch"


def test_other_accelerators_fall_back_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="no kernel of this package runs on xpu devices"):
        assert resolve_backend("auto", torch.device("xpu")) == "torch"


def test_the_fallback_warning_names_the_callers_line(monkeypatch) -> None:
    monkeypatch.setattr(_backend, "triton_status", lambda: "triton is broken here")
    with pytest.warns(UserWarning) as record:
        resolve_backend("auto", CUDA, stacklevel=2)  # 2: the direct caller, this test
    assert record[0].filename == __file__


def test_env_var_overrides_auto_only(monkeypatch, triton_works) -> None:
    monkeypatch.setenv("OPSD_BACKEND", "torch")
    assert resolve_backend("auto", CUDA, ATTENTION) == "torch"
    assert resolve_backend("triton", CUDA, ATTENTION) == "triton"  # explicit wins


def test_env_var_naming_a_backend_the_op_lacks_leaves_it_on_auto(monkeypatch,
                                                                 triton_works) -> None:
    """OPSD_BACKEND is process-wide: native for the losses leaves attention on its own choice."""
    monkeypatch.setenv("OPSD_BACKEND", "native")
    assert resolve_backend("auto", CPU, ATTENTION) == "torch"
    assert resolve_backend("auto", CUDA, ATTENTION) == "triton"


def test_env_var_typo_names_the_argument(monkeypatch) -> None:
    monkeypatch.setenv("OPSD_BACKEND", "cuda")
    for available in (KERNEL_BACKENDS, ATTENTION):
        with pytest.raises(ValueError, match=r"^backend: OPSD_BACKEND='cuda' is not one of"):
            resolve_backend("auto", CPU, available)


def test_unknown_or_missing_backend_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^backend: expected one of .*, got 'cuda'$"):
        resolve_backend("cuda", CPU, ATTENTION, "shared-prefix attention")
    with pytest.raises(ValueError, match=r"^backend: .*'native' \(shared-prefix attention has "
                       "no native kernel\\)"):
        resolve_backend("native", CPU, ATTENTION, "shared-prefix attention")


def test_explicit_triton_that_cannot_run_raises(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for available in (KERNEL_BACKENDS, ATTENTION):
        with pytest.raises(RuntimeError, match="backend='triton' cannot run: .*TRITON_INTERPRET"):
            resolve_backend("triton", CPU, available)
