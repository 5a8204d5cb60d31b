"""The registered ops and the package around them: opcheck, torch.compile, lean import, backend
choice, the nn.Module, a workspace that does not grow with the tokens, no host syncs."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Before opsd_kernels (and with it triton.jit) is imported: the kernels run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import opsd_kernels  # noqa: E402
from opsd_kernels import (  # noqa: E402
    FusedLinearDivergenceLoss,
    chunked,
    divergence,
    fused_linear_divergence,
    linear,
)
from opsd_kernels import _backend as backend_mod  # noqa: E402
from opsd_kernels.library import (  # noqa: E402
    divergence_op,
    divergence_rows_op,
    fused_linear_divergence_op,
    fused_linear_divergence_rows_op,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNNABLE = HAS_TRITON and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton not runnable here")
# The interpreter evaluates -inf - -inf on masked lanes (the kernel discards those values).
interp_warnings = pytest.mark.filterwarnings("ignore::RuntimeWarning")

PACKAGE_DIR = Path(opsd_kernels.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent
N, H, V = 5, 8, 37


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).requires_grad_(grad)


def _labels(n: int, vocab: int = V, seed: int = 7) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=_gen(seed))
    labels[1] = -100
    return labels


# --- torch.library.opcheck ----------------------------------------------------------------------

# (kind, beta, temperature, teacher_temperature, top_k, top_k_source, tail_bucket, clip, softcap,
#  ignore_index): the scalar arguments every op takes, before (backend, chunk_size).
OPTION_SETS = {
    "jsd": ("jsd", 0.5, 1.0, 1.0, 0, "teacher", False, None, None, -100),
    "fkl_topk_tail": ("forward_kl", 0.0, 0.8, 1.2, 4, "student", True, None, None, -100),
    "rkl_clip_softcap": ("reverse_kl", 1.0, 1.1, 1.1, 0, "teacher", False, 0.05, 3.0, -100),
    "sampled": ("sampled", 0.5, 1.0, 1.0, 0, "teacher", False, None, None, -100),
}


def _opcheck(op, args: tuple) -> None:
    torch.library.opcheck(op, args, raise_exception=True)


def _linear_tensors(optional: bool) -> tuple:
    h_s, w = _randn(N, H, seed=1, grad=True), _randn(V, H, seed=2, grad=True)
    h_t = _randn(N, H + 3 if optional else H, seed=3)
    w_t = _randn(V, H + 3, seed=4) if optional else None
    labels = _labels(N) if optional else None
    b_s = _randn(V, seed=5, grad=True) if optional else None
    b_t = _randn(V, seed=6) if optional else None
    return h_s, w, h_t, w_t, labels, b_s, b_t


LINEAR_CASES = [
    # (option set, optional tensors, need_grad_h, need_grad_w, need_grad_bs)
    ("jsd", True, True, True, True),
    ("jsd", False, True, False, False),
    ("jsd", False, False, True, False),
    ("jsd", True, False, False, False),
    ("fkl_topk_tail", True, True, True, False),
    ("rkl_clip_softcap", False, True, True, False),
    ("sampled", True, True, False, True),
    # need_grad_bs without a bias: the fake gives an empty gradient, so must the real op.
    ("jsd", False, True, True, True),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_opcheck_fused_linear_divergence(case) -> None:
    name, optional, need_h, need_w, need_bs = case
    h_s, w, h_t, w_t, labels, b_s, b_t = _linear_tensors(optional or name == "sampled")
    coef = torch.rand(N, generator=_gen(8))
    _opcheck(fused_linear_divergence_op, (h_s, w, h_t, w_t, labels, coef, b_s, b_t,
                                          *OPTION_SETS[name], "torch", 2, need_h, need_w,
                                          need_bs))


@pytest.mark.parametrize("name,optional", [("jsd", True), ("jsd", False),
                                           ("fkl_topk_tail", False), ("rkl_clip_softcap", True),
                                           ("sampled", True)])
def test_opcheck_fused_linear_divergence_rows(name: str, optional: bool) -> None:
    h_s, w, h_t, w_t, labels, b_s, b_t = _linear_tensors(optional)
    _opcheck(fused_linear_divergence_rows_op, (h_s, w, h_t, w_t, labels, b_s, b_t,
                                               *OPTION_SETS[name], "torch", 0))


def _logits(with_labels: bool) -> tuple:
    return (_randn(N, V, seed=11, grad=True), _randn(N, V, seed=12),
            _labels(N) if with_labels else None)


@pytest.mark.parametrize("name,with_labels,need_grad", [
    ("jsd", True, True), ("jsd", False, True), ("jsd", True, False),
    ("fkl_topk_tail", False, True), ("rkl_clip_softcap", True, True), ("sampled", True, True),
])
def test_opcheck_divergence(name: str, with_labels: bool, need_grad: bool) -> None:
    s, t, labels = _logits(with_labels)
    coef = torch.rand(N, generator=_gen(8))
    _opcheck(divergence_op, (s, t, labels, coef, *OPTION_SETS[name], "torch", 3, need_grad))


@pytest.mark.parametrize("name,with_labels", [("jsd", True), ("jsd", False),
                                              ("fkl_topk_tail", True), ("sampled", True)])
def test_opcheck_divergence_rows(name: str, with_labels: bool) -> None:
    s, t, labels = _logits(with_labels)
    _opcheck(divergence_rows_op, (s, t, labels, *OPTION_SETS[name], "torch", 0))


@needs_triton
@interp_warnings
def test_opcheck_triton_backend() -> None:
    """Every op once through the Triton row step (interpreted on CPU)."""
    opts = (*OPTION_SETS["jsd"], "triton", 3)
    h_s, w, h_t, w_t, labels, b_s, b_t = _linear_tensors(True)
    coef = torch.rand(N, generator=_gen(8))
    _opcheck(fused_linear_divergence_op,
             (h_s, w, h_t, w_t, labels, coef, b_s, b_t, *opts, True, True, True))
    h_s, w, h_t, *_ = _linear_tensors(False)
    _opcheck(fused_linear_divergence_rows_op, (h_s, w, h_t, None, None, None, None, *opts))
    s, t, labels = _logits(True)
    _opcheck(divergence_op, (s, t, labels, coef, *opts, True))
    _opcheck(divergence_rows_op, (s, t, None, *opts))


# --- torch.compile ------------------------------------------------------------------------------


class _TinyStudent(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.embed(ids)))


def _fused_loss(model, ids, teacher_hidden, labels, reduction) -> torch.Tensor:
    loss = fused_linear_divergence(model(ids), model.lm_head.weight, teacher_hidden,
                                   labels=labels, reduction=reduction, backend="torch",
                                   temperature=1.3)
    return loss.sum() if reduction == "none" else loss


def _naive_loss(model, ids, teacher_hidden, labels, reduction) -> torch.Tensor:
    """Materialised logits and plain autograd: what the fused loss replaces."""
    s = (model(ids) @ model.lm_head.weight.t()) / 1.3
    t = (teacher_hidden @ model.lm_head.weight.detach().t()) / 1.3
    log_p, log_q = s.log_softmax(-1), t.log_softmax(-1)
    log_m = torch.logaddexp(log_q + torch.log(torch.tensor(0.5)),
                            log_p + torch.log(torch.tensor(0.5)))
    per_token = 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    per_token = per_token + 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1)
    valid = labels != -100
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    return per_token.sum() if reduction == "none" else per_token.sum() / valid.sum()


def _train(loss_fn, model: nn.Module, batches) -> tuple[list, list]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], []
    for ids, teacher_hidden, labels in batches:
        opt.zero_grad()
        loss = loss_fn(model, ids, teacher_hidden, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return losses, grads


@pytest.mark.parametrize("use_compile", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_training_step_compiles_and_matches(reduction: str, use_compile: bool) -> None:
    torch.manual_seed(0)
    vocab, hidden, b, t = 37, 16, 2, 5
    model = _TinyStudent(vocab, hidden)
    batches = []
    for step in range(2):
        g = _gen(100 + step)
        ids = torch.randint(0, vocab, (b, t), generator=g)
        labels = torch.randint(0, vocab, (b, t), generator=g)
        labels[0, step] = -100
        batches.append((ids, torch.randn(b, t, hidden, generator=g), labels))

    def fused(m, *batch):
        return _fused_loss(m, *batch, reduction)

    if use_compile:
        torch._dynamo.reset()
        fused = torch.compile(fused, fullgraph=True)
    got = _train(fused, copy.deepcopy(model), batches)
    want = _train(lambda m, *batch: _naive_loss(m, *batch, reduction), copy.deepcopy(model),
                  batches)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    if use_compile:
        eager = _train(lambda m, *batch: _fused_loss(m, *batch, reduction), copy.deepcopy(model),
                       batches)
        torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-5)


# --- lean import --------------------------------------------------------------------------------


def _run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _check_ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_import_without_triton_is_lean() -> None:
    out = _check_ok(_run_python("""
        import sys
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        import torch
        import opsd_kernels
        assert sys.modules["triton"] is None, "something replaced the triton block"
        assert not torch.cuda.is_initialized(), "import initialised CUDA"
        report = opsd_kernels.env_report()
        assert not torch.cuda.is_initialized(), "env_report initialised CUDA"
        assert set(report) >= {"torch", "triton", "native", "cuda"}, report
        assert report["triton"].startswith("unusable") and "not installed" in report["triton"]
        assert report["native"].startswith("built (CPU kernel ") or (
            report["native"].startswith("unusable") and "opsd_kernels._C" in report["native"])
        # The PyTorch backend still works end to end, and 'triton' says why it cannot run.
        h = torch.randn(4, 8, requires_grad=True)
        w = torch.randn(11, 8, requires_grad=True)
        opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8), backend="torch").backward()
        assert h.grad is not None and w.grad is not None
        try:
            opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8), backend="triton")
        except RuntimeError as err:
            assert "triton" in str(err) and "not installed" in str(err), err
        else:
            raise AssertionError("backend='triton' ran without triton")
        assert not torch.cuda.is_initialized()
        print("OK")
    """, TRITON_INTERPRET="1", OPSD_BACKEND=None))
    assert out.strip().endswith("OK")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_import_does_not_import_triton_or_touch_cuda() -> None:
    """With triton installed, importing the package leaves it unimported: the kernels module
    loads only when a Triton backend runs (env_report, a diagnostic, may import it to check)."""
    out = _check_ok(_run_python("""
        import sys
        import torch
        import opsd_kernels
        assert "triton" not in sys.modules, "import opsd_kernels imported triton"
        assert "opsd_kernels.ops.divergence" not in sys.modules
        report = opsd_kernels.env_report()
        assert not torch.cuda.is_initialized()
        print(report["triton"])
    """, TRITON_INTERPRET=None, OPSD_BACKEND=None))
    if not torch.cuda.is_available():
        assert "unusable" in out and "TRITON_INTERPRET" in out


# --- backend selection --------------------------------------------------------------------------


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
    real = chunked.row_step_for

    def spy(backend: str):
        seen.append(backend)
        return real(backend)

    monkeypatch.setattr(linear, "row_step_for", spy)
    return seen


FUNCTIONS = ["fused_linear_divergence", "divergence"]


NATIVE_BUILT = backend_mod.native_status() is None


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_auto_on_cpu_is_native_when_built_else_torch(fn_name: str, monkeypatch,
                                                     used_backends) -> None:
    monkeypatch.delenv("OPSD_BACKEND", raising=False)
    expected = "native" if NATIVE_BUILT else "torch"
    assert backend_mod.resolve_backend("auto", torch.device("cpu")) == expected
    auto = _call(fn_name, "auto")
    assert used_backends == [expected]
    torch.testing.assert_close(auto, _call(fn_name, "torch"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_auto_on_cpu_without_native_is_torch(fn_name: str, monkeypatch, used_backends) -> None:
    monkeypatch.delenv("OPSD_BACKEND", raising=False)
    monkeypatch.setattr(backend_mod, "_native_runs_on_cpu", lambda: False)
    assert backend_mod.resolve_backend("auto", torch.device("cpu")) == "torch"
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


@needs_triton
@interp_warnings
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
        assert backend_mod.resolve_backend("auto", cuda) == "triton"
    monkeypatch.setattr(backend_mod, "triton_status", lambda: "triton is broken here")
    with pytest.warns(UserWarning, match="falling back.*triton is broken here"):
        assert backend_mod.resolve_backend("auto", cuda) == "torch"
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_unknown_backend(fn_name: str) -> None:
    with pytest.raises(ValueError, match=r"^backend: .*'cuda'"):
        _call(fn_name, "cuda")


@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_native_backend_without_the_extension_is_a_clear_error(fn_name: str,
                                                               monkeypatch) -> None:
    from opsd_kernels import _native

    why = "the native extension opsd_kernels._C is not built (for this test)"
    monkeypatch.setattr(_native, "_load", lambda: (None, why))
    with pytest.raises(RuntimeError, match=r"backend='native' cannot run: .*not built"):
        _call(fn_name, "native")


def test_triton_on_cpu_without_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend_mod.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available() or not HAS_TRITON,
                    reason="needs a CPU-only machine with triton installed")
def test_triton_on_cpu_without_interpreter_subprocess() -> None:
    out = _check_ok(_run_python("""
        import torch
        import opsd_kernels
        h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)
        for call in (
            lambda: opsd_kernels.fused_linear_divergence(h, w, torch.randn(4, 8),
                                                         backend="triton"),
            lambda: opsd_kernels.divergence(torch.randn(4, 11), torch.randn(4, 11),
                                            backend="triton"),
        ):
            try:
                call()
            except RuntimeError as err:
                assert "TRITON_INTERPRET" in str(err), err
            else:
                raise AssertionError("backend='triton' ran on CPU without the interpreter")
        print("OK")
    """, TRITON_INTERPRET=None, OPSD_BACKEND=None))
    assert out.strip() == "OK"


# --- FusedLinearDivergenceLoss ------------------------------------------------------------------


def _module_inputs() -> dict:
    b, t = 2, 3
    return dict(
        student_hidden=_randn(b, t, H, seed=21, grad=True),
        weight=_randn(V, H, seed=22, grad=True),
        teacher_hidden=_randn(b, t, H + 2, seed=23),
        teacher_weight=_randn(V, H + 2, seed=24),
        labels=torch.tensor([[3, -100, 5], [0, 36, 2]]),
        token_weights=torch.rand(b, t, generator=_gen(25)) + 0.5,
        student_bias=_randn(V, seed=26, grad=True),
    )


@pytest.mark.parametrize("options", [
    {},
    dict(divergence="forward_kl", temperature=1.3, reduction="sum", backend="torch"),
    dict(divergence="jsd", beta=0.3, top_k=5, tail_bucket=True, reduction="sequence_mean",
         chunk_size=2, return_stats=True),
    dict(divergence="reverse_kl", clip=0.1, logit_softcap=4.0, reduction="none"),
])
def test_module_equals_function(options: dict) -> None:
    loss_fn = FusedLinearDivergenceLoss(**options)
    for key, value in options.items():
        assert f"{key}={value!r}" in repr(loss_fn)

    inputs = _module_inputs()
    tensors = (inputs["student_hidden"], inputs["weight"], inputs["teacher_hidden"],
               inputs["teacher_weight"])
    per_call = {k: inputs[k] for k in ("labels", "token_weights", "student_bias")}
    got = loss_fn(*tensors, **per_call)
    want = fused_linear_divergence(*tensors, **per_call, **options)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    loss_got = got[0] if options.get("return_stats") else got
    loss_want = want[0] if options.get("return_stats") else want
    params = (inputs["student_hidden"], inputs["weight"], inputs["student_bias"])
    grads_got = torch.autograd.grad(loss_got.sum(), params)
    grads_want = torch.autograd.grad(loss_want.sum(), params)
    torch.testing.assert_close(grads_got, grads_want, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["labels", "token_weights", "num_items", "student_bias",
                                  "teacher_bias"])
def test_module_rejects_per_call_tensors_in_constructor(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: pass it to forward"):
        FusedLinearDivergenceLoss(**{name: None})


@pytest.mark.parametrize("name,value", [("beta", 0.3), ("reduction", "sum"), ("backend", "torch"),
                                        ("bogus", 1)])
def test_module_rejects_options_in_forward(name: str, value) -> None:
    inputs = _module_inputs()
    with pytest.raises(ValueError, match=rf"^{name}: not a per-call argument"):
        FusedLinearDivergenceLoss()(inputs["student_hidden"], inputs["weight"],
                                    inputs["teacher_hidden"], inputs["teacher_weight"],
                                    **{name: value})


@pytest.mark.parametrize("options,exc,match", [
    (dict(beta=2.0), ValueError, r"^beta:"),
    (dict(reduction="avg"), ValueError, r"^reduction:"),
    (dict(backend="gpu"), ValueError, r"^backend:"),
    (dict(bogus_option=1), (TypeError, ValueError), "bogus_option"),
])
def test_module_bad_options_raise(options: dict, exc, match: str) -> None:
    inputs = _module_inputs()
    with pytest.raises(exc, match=match):
        FusedLinearDivergenceLoss(**options)(inputs["student_hidden"], inputs["weight"],
                                             inputs["teacher_hidden"], inputs["teacher_weight"])


# --- workspace: O(chunk x V), independent of the number of tokens -------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_chunk_rows_is_capped_independently_of_n(backend: str, device: str) -> None:
    dev, vocab = torch.device(device), 151_936
    cap = chunked.chunk_rows(10**6, vocab, backend, None, dev)
    assert 1 <= cap < 10**6
    for n in (10**7, 10**9, 2**40):
        assert chunked.chunk_rows(n, vocab, backend, None, dev) == cap
    workspace_per_row = 4 * vocab * (2 + chunked.extra_row_buffers(backend, dev))
    assert cap * workspace_per_row <= chunked.DEFAULT_WORKSPACE_BYTES[device]
    assert chunked.chunk_rows(3, vocab, backend, None, dev) == 3  # never more rows than exist
    for n in (7, 100, 10**9):
        assert chunked.chunk_rows(n, vocab, backend, 7, dev) == 7
    assert chunked.chunk_rows(3, vocab, backend, 7, dev) == 3


@pytest.fixture
def row_blocks(monkeypatch) -> list[int]:
    """The number of rows of every block the row step sees."""
    seen: list[int] = []
    real = linear.run_row_step

    def spy(step, s, *args):
        seen.append(s.shape[0])
        return real(step, s, *args)

    monkeypatch.setattr(linear, "run_row_step", spy)
    return seen


@pytest.mark.parametrize("n", [37, 211])
def test_default_workspace_bounds_the_block(n: int, monkeypatch, row_blocks) -> None:
    vocab = 53
    per_row = 4 * vocab * (2 + chunked._EXTRA_ROW_BUFFERS["torch"])
    monkeypatch.setitem(chunked.DEFAULT_WORKSPACE_BYTES, "cpu", 5 * per_row)
    h_s = _randn(n, H, seed=31, grad=True)
    w = _randn(vocab, H, seed=32, grad=True)
    fused_linear_divergence(h_s, w, _randn(n, H, seed=33), backend="torch").backward()
    divergence(_randn(n, vocab, seed=34, grad=True), _randn(n, vocab, seed=35),
               backend="torch").backward()
    assert max(row_blocks) == 5
    assert sum(row_blocks) == 2 * n


def _all_outputs(fn_name: str, n: int, chunk_size: int | None, reduction: str) -> list:
    g = _gen(40)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -100
    common = dict(labels=labels, reduction=reduction, backend="torch", chunk_size=chunk_size,
                  return_stats=True, beta=0.3, token_weights=torch.rand(n, generator=g))
    if fn_name == "fused_linear_divergence":
        inputs = [torch.randn(n, H, generator=g).requires_grad_(),
                  torch.randn(V, H, generator=g).requires_grad_(),
                  torch.randn(n, H, generator=g)]
        bias = torch.randn(V, generator=g).requires_grad_()
        loss, stats = fused_linear_divergence(*inputs, student_bias=bias, **common)
        params = [inputs[0], inputs[1], bias]
    else:
        params = [torch.randn(n, V, generator=g).requires_grad_()]
        loss, stats = divergence(params[0], torch.randn(n, V, generator=g), **common)
    loss.sum().backward()
    return [loss.detach(), *stats, *(p.grad for p in params)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fn_name", FUNCTIONS)
def test_result_does_not_depend_on_chunk_size(fn_name: str, reduction: str, row_blocks) -> None:
    n = 23
    want = _all_outputs(fn_name, n, None, reduction)
    for chunk_size in (1, 7, n, 10 * n):
        row_blocks.clear()
        got = _all_outputs(fn_name, n, chunk_size, reduction)
        assert max(row_blocks) == min(chunk_size, n)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


# --- no host synchronisation ----------------------------------------------------------------------

_HOST_SYNC = re.compile(r"\.(item|tolist|cpu|numpy)\(\)|bool\([^()]*\.(all|any)\(\)\)")


def _loss_path_sources() -> list[Path]:
    """The package modules the public names load, plus the kernels (loaded lazily).

    Modules off the loss path (demo, CLI, trainer) may sync for printing and logging."""
    out = _check_ok(_run_python("""
        import sys
        import opsd_kernels
        for public in opsd_kernels.__all__:  # loaded on first use
            getattr(opsd_kernels, public)
        for name, module in sorted(sys.modules.items()):
            if name.startswith("opsd_kernels") and getattr(module, "__file__", None):
                print(module.__file__)
    """, OPSD_BACKEND=None))
    files = {Path(line) for line in out.split()} | set((PACKAGE_DIR / "ops").glob("*.py"))
    assert PACKAGE_DIR / "losses.py" in files and PACKAGE_DIR / "linear.py" in files
    return sorted(files)


def test_no_host_sync_calls_in_source() -> None:
    offenders = []
    for path in _loss_path_sources():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if _HOST_SYNC.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{lineno}: {line.strip()}")
    # Allowed: the label range check reads a bool on CPU only (_assert_async on device), and
    # the fused CPU attention path reads its CPU group ids and prefix lengths (no device there).
    cpu_reads = {("opsd_kernels/_validate.py", "bool(in_range.all())"),
                 ("opsd_kernels/ops/attention_torch.py", "lengths = prefix_lengths.tolist()"),
                 ("opsd_kernels/ops/attention_torch.py",
                  "for row, g in enumerate(group_index.tolist()):")}
    allowed = [o for o in offenders
               if any(o.startswith(path) and code in o for path, code in cpu_reads)]
    assert len(allowed) <= len(cpu_reads)
    offenders = [o for o in offenders if o not in allowed]
    assert not offenders, "host syncs on the loss path:\n" + "\n".join(offenders)


@pytest.fixture
def no_host_sync(monkeypatch):
    """Tensor -> Python conversions raise while the fixture is active."""

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called on the loss path")
        return raiser

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    # The label range check reads a bool on CPU only (on device it uses _assert_async).
    monkeypatch.setattr(opsd_kernels.losses.v, "check_labels", lambda *args: None)


@pytest.mark.parametrize("reduction", ["mean", "sequence_mean", "none"])
def test_forward_and_backward_make_no_host_conversions(reduction: str, no_host_sync) -> None:
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(()))  # the fixture is armed
    inputs = _module_inputs()
    for options in (dict(), dict(top_k=4, tail_bucket=True, divergence="forward_kl"),
                    dict(divergence="sampled")):
        loss = fused_linear_divergence(
            inputs["student_hidden"], inputs["weight"], inputs["teacher_hidden"],
            inputs["teacher_weight"], labels=inputs["labels"], reduction=reduction,
            token_weights=inputs["token_weights"], student_bias=inputs["student_bias"],
            backend="torch", **options)
        loss.sum().backward()
        s = _randn(2, 3, V, seed=41, grad=True)
        divergence(s, _randn(2, 3, V, seed=42), labels=inputs["labels"], reduction=reduction,
                   backend="torch", **options).sum().backward()
