"""Bad inputs fail early with a ValueError that starts with the argument's name; an all-masked
batch is a zero loss with zero gradients, never NaN."""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Before opsd_kernels (and with it triton.jit) is imported: the kernels run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from opsd_kernels import divergence, divergence_stats, fused_linear_divergence  # noqa: E402

TRITON_RUNNABLE = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
B, T, H, V = 2, 3, 8, 11
NAN, INF = float("nan"), float("inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_inputs() -> dict:
    g = _gen(0)
    return dict(
        student_hidden=torch.randn(B, T, H, generator=g).requires_grad_(),
        weight=torch.randn(V, H, generator=g).requires_grad_(),
        teacher_hidden=torch.randn(B, T, H, generator=g),
    )


def _logit_inputs() -> dict:
    g = _gen(1)
    return dict(
        student_logits=torch.randn(B, T, V, generator=g).requires_grad_(),
        teacher_logits=torch.randn(B, T, V, generator=g),
    )


def _labels(**kwargs) -> torch.Tensor:
    return torch.tensor([[1, 2, -100], [0, 10, 5]], **kwargs)


def _raises(fn, inputs: dict, name: str, exc: type[Exception] = ValueError):
    with pytest.raises(exc, match=rf"^{name}\b"):
        fn(**inputs)


# --- shapes, dtypes and devices of the fused-linear inputs ---------------------------------------


def _replace(name: str, make):
    def apply(inputs: dict) -> None:
        inputs[name] = make(inputs)
    return apply


LINEAR_TENSOR_CASES = {
    # case id: (mutation of the default inputs, the argument the error must name)
    "student_hidden_1d": (_replace("student_hidden", lambda d: torch.randn(H)), "student_hidden"),
    "teacher_hidden_4d": (_replace("teacher_hidden", lambda d: torch.randn(1, B, T, H)),
                          "teacher_hidden"),
    "weight_3d": (_replace("weight", lambda d: torch.randn(1, V, H)), "weight"),
    "token_dims": (_replace("teacher_hidden", lambda d: torch.randn(B, T + 1, H)),
                   "teacher_hidden"),
    "token_dims_flat_vs_3d": (_replace("teacher_hidden", lambda d: torch.randn(B * T, H)),
                              "teacher_hidden"),
    "weight_hidden_size": (_replace("weight", lambda d: torch.randn(V, H + 1)), "weight"),
    "teacher_weight_vocab": (_replace("teacher_weight", lambda d: torch.randn(V + 1, H)),
                             "teacher_weight"),
    "teacher_hidden_size_shared_head": (
        _replace("teacher_hidden", lambda d: torch.randn(B, T, H + 2)), "teacher_hidden"),
    "teacher_hidden_size_own_head": (
        lambda d: d.update(teacher_weight=torch.randn(V, H + 2),
                           teacher_hidden=torch.randn(B, T, H + 3)), "teacher_hidden"),
    "student_dtype_vs_weight": (
        _replace("student_hidden", lambda d: d["student_hidden"].detach().bfloat16()),
        "student_hidden"),
    "teacher_dtype_vs_head": (
        _replace("teacher_hidden", lambda d: d["teacher_hidden"].half()), "teacher_hidden"),
    "teacher_dtype_vs_own_head": (
        _replace("teacher_weight", lambda d: torch.randn(V, H, dtype=torch.bfloat16)),
        "teacher_hidden"),
    "student_hidden_float64": (
        lambda d: d.update(student_hidden=d["student_hidden"].double(),
                           weight=d["weight"].double()), "student_hidden"),
    "teacher_hidden_float64": (
        _replace("teacher_hidden", lambda d: d["teacher_hidden"].double()), "teacher_hidden"),
    "weight_float64": (_replace("weight", lambda d: d["weight"].double()), "weight"),
    "teacher_weight_float64": (
        _replace("teacher_weight", lambda d: torch.randn(V, H, dtype=torch.float64)),
        "teacher_weight"),
    "student_hidden_integer": (
        _replace("student_hidden", lambda d: torch.ones(B, T, H, dtype=torch.int32)),
        "student_hidden"),
    "teacher_hidden_requires_grad": (
        _replace("teacher_hidden", lambda d: d["teacher_hidden"].requires_grad_()),
        "teacher_hidden"),
    "student_bias_shape": (_replace("student_bias", lambda d: torch.randn(V + 1)),
                           "student_bias"),
    "student_bias_2d": (_replace("student_bias", lambda d: torch.randn(1, V)), "student_bias"),
    "student_bias_dtype": (_replace("student_bias", lambda d: torch.randn(V).bfloat16()),
                           "student_bias"),
    "teacher_bias_shape": (_replace("teacher_bias", lambda d: torch.randn(V - 1)),
                           "teacher_bias"),
    "teacher_bias_dtype": (
        lambda d: d.update(teacher_weight=torch.randn(V, H).half(),
                           teacher_hidden=d["teacher_hidden"].half(),
                           teacher_bias=torch.randn(V)), "teacher_bias"),
    "teacher_hidden_on_meta": (_replace("teacher_hidden", lambda d: torch.randn(B, T, H,
                                                                                device="meta")),
                               "teacher_hidden"),
    "weight_on_meta": (_replace("weight", lambda d: torch.randn(V, H, device="meta")), "weight"),
    "teacher_weight_on_meta": (_replace("teacher_weight",
                                        lambda d: torch.randn(V, H, device="meta")),
                               "teacher_weight"),
    "student_bias_on_meta": (_replace("student_bias", lambda d: torch.randn(V, device="meta")),
                             "student_bias"),
    "labels_on_meta": (_replace("labels", lambda d: _labels(device="meta")), "labels"),
    "token_weights_on_meta": (_replace("token_weights",
                                       lambda d: torch.rand(B, T, device="meta")),
                              "token_weights"),
}


@pytest.mark.parametrize("case", sorted(LINEAR_TENSOR_CASES))
def test_fused_linear_bad_tensor(case: str) -> None:
    mutate, name = LINEAR_TENSOR_CASES[case]
    inputs = _linear_inputs()
    mutate(inputs)
    _raises(fused_linear_divergence, inputs, name)


LOGIT_TENSOR_CASES = {
    "student_logits_1d": (_replace("student_logits", lambda d: torch.randn(V)), "student_logits"),
    "teacher_logits_4d": (_replace("teacher_logits", lambda d: torch.randn(1, B, T, V)),
                          "teacher_logits"),
    "vocab_mismatch": (_replace("teacher_logits", lambda d: torch.randn(B, T, V + 1)),
                       "teacher_logits"),
    "token_dims": (_replace("teacher_logits", lambda d: torch.randn(B, T + 1, V)),
                   "teacher_logits"),
    "student_logits_float64": (
        _replace("student_logits", lambda d: d["student_logits"].double()), "student_logits"),
    "teacher_logits_float64": (
        _replace("teacher_logits", lambda d: d["teacher_logits"].double()), "teacher_logits"),
    "student_logits_integer": (
        _replace("student_logits", lambda d: torch.ones(B, T, V, dtype=torch.int64)),
        "student_logits"),
    "teacher_logits_requires_grad": (
        _replace("teacher_logits", lambda d: d["teacher_logits"].requires_grad_()),
        "teacher_logits"),
    "teacher_logits_on_meta": (
        _replace("teacher_logits", lambda d: torch.randn(B, T, V, device="meta")),
        "teacher_logits"),
    "labels_on_meta": (_replace("labels", lambda d: _labels(device="meta")), "labels"),
    "token_weights_on_meta": (_replace("token_weights",
                                       lambda d: torch.rand(B, T, device="meta")),
                              "token_weights"),
}


@pytest.mark.parametrize("case", sorted(LOGIT_TENSOR_CASES))
def test_divergence_bad_tensor(case: str) -> None:
    mutate, name = LOGIT_TENSOR_CASES[case]
    inputs = _logit_inputs()
    mutate(inputs)
    _raises(divergence, inputs, name)


# --- per-token tensors and scalar options: both entry points ------------------------------------

ENTRY_POINTS = {"fused_linear_divergence": (fused_linear_divergence, _linear_inputs),
                "divergence": (divergence, _logit_inputs)}

OPTION_CASES = [
    # (id, keyword arguments, the argument the error must name)
    ("labels_float", dict(labels=_labels().float()), "labels"),
    ("labels_bool", dict(labels=_labels() > 0), "labels"),
    ("labels_shape", dict(labels=_labels().reshape(-1)), "labels"),
    ("labels_too_large", dict(labels=torch.tensor([[1, 2, V], [0, 1, 2]])), "labels"),
    ("labels_negative", dict(labels=torch.tensor([[1, 2, -1], [0, 1, 2]])), "labels"),
    ("labels_old_ignore_index", dict(labels=_labels(), ignore_index=-1), "labels"),
    ("token_weights_integer", dict(token_weights=torch.ones(B, T, dtype=torch.int64)),
     "token_weights"),
    ("token_weights_bool", dict(token_weights=torch.ones(B, T, dtype=torch.bool)),
     "token_weights"),
    ("token_weights_shape", dict(token_weights=torch.ones(B * T)), "token_weights"),
    ("token_weights_requires_grad", dict(token_weights=torch.ones(B, T, requires_grad=True)),
     "token_weights"),
    ("beta_negative", dict(beta=-0.1), "beta"),
    ("beta_above_one", dict(beta=1.5), "beta"),
    ("beta_nan", dict(beta=NAN), "beta"),
    ("beta_tensor", dict(beta=torch.tensor(0.5)), "beta"),
    ("temperature_zero", dict(temperature=0.0), "temperature"),
    ("temperature_negative", dict(temperature=-1.0), "temperature"),
    ("temperature_inf", dict(temperature=INF), "temperature"),
    ("temperature_nan", dict(temperature=NAN), "temperature"),
    ("teacher_temperature_zero", dict(teacher_temperature=0.0), "teacher_temperature"),
    ("teacher_temperature_negative", dict(teacher_temperature=-2.0), "teacher_temperature"),
    ("teacher_temperature_nan", dict(teacher_temperature=NAN), "teacher_temperature"),
    ("top_k_zero", dict(top_k=0), "top_k"),
    ("top_k_negative", dict(top_k=-3), "top_k"),
    ("top_k_above_vocab", dict(top_k=V + 1), "top_k"),
    ("top_k_float", dict(top_k=2.0), "top_k"),
    ("tail_bucket_without_top_k", dict(tail_bucket=True), "tail_bucket"),
    ("top_k_source", dict(top_k=3, top_k_source="both"), "top_k_source"),
    ("clip_zero", dict(clip=0.0), "clip"),
    ("clip_negative", dict(clip=-0.5), "clip"),
    ("clip_nan", dict(clip=NAN), "clip"),
    ("logit_softcap_zero", dict(logit_softcap=0.0), "logit_softcap"),
    ("logit_softcap_negative", dict(logit_softcap=-30.0), "logit_softcap"),
    ("sampled_without_labels", dict(divergence="sampled"), "labels"),
    ("sampled_with_top_k", dict(divergence="sampled", labels=_labels(), top_k=3), "top_k"),
    ("sampled_with_clip", dict(divergence="sampled", labels=_labels(), clip=1.0), "clip"),
    ("unknown_divergence", dict(divergence="kl"), "divergence"),
    ("unknown_reduction", dict(reduction="avg"), "reduction"),
    ("num_items_with_sum", dict(reduction="sum", num_items=4), "num_items"),
    ("num_items_with_none", dict(reduction="none", num_items=torch.tensor(4.0)), "num_items"),
    ("chunk_size_zero", dict(chunk_size=0), "chunk_size"),
    ("chunk_size_negative", dict(chunk_size=-4), "chunk_size"),
    ("chunk_size_float", dict(chunk_size=2.5), "chunk_size"),
    ("unknown_backend", dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_option(entry: str, case) -> None:
    _, kwargs, name = case
    fn, make = ENTRY_POINTS[entry]
    _raises(fn, {**make(), **kwargs}, name)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_sequence_mean_needs_batch_and_time(entry: str) -> None:
    fn, make = ENTRY_POINTS[entry]
    flat = {k: v.detach().flatten(0, 1).requires_grad_(v.requires_grad) if v.dim() == 3 else v
            for k, v in make().items()}
    _raises(fn, {**flat, "reduction": "sequence_mean"}, "reduction")
    fn(**flat, reduction="mean")  # the same 2-D inputs are fine otherwise


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_unusable_native_backend_raises_runtime_error(entry: str, monkeypatch) -> None:
    from opsd_kernels import _native

    monkeypatch.setattr(_native, "_load", lambda: (None, "opsd_kernels._C is not built"))
    fn, make = ENTRY_POINTS[entry]
    _raises(fn, {**make(), "backend": "native"}, "backend", RuntimeError)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_valid_edge_options_pass(entry: str) -> None:
    """The boundaries of the checks above are accepted."""
    fn, make = ENTRY_POINTS[entry]
    for kwargs in (dict(beta=0.0), dict(beta=1.0), dict(top_k=1), dict(top_k=V, tail_bucket=True),
                   dict(labels=torch.tensor([[1, 2, -1], [0, V - 1, -1]]), ignore_index=-1),
                   dict(labels=_labels(dtype=torch.int32)), dict(chunk_size=1),
                   dict(token_weights=torch.rand(B, T).half()),
                   dict(reduction="sequence_mean", num_items=3)):
        loss = fn(**make(), backend="torch", **kwargs)
        assert torch.isfinite(loss).all(), kwargs


def test_divergence_stats_rejects_reduction_options() -> None:
    for name, value in (("reduction", "sum"), ("token_weights", torch.ones(B, T)),
                        ("num_items", 3), ("return_stats", True)):
        _raises(divergence_stats, {**_linear_inputs(), name: value}, name)


# --- masked tokens ------------------------------------------------------------------------------

BACKENDS = ["torch", pytest.param("triton", marks=[
    pytest.mark.skipif(not TRITON_RUNNABLE, reason="triton not runnable here"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # -inf - -inf on the masked rows
])]
REDUCTIONS = ["mean", "sum", "none", "sequence_mean"]


def _params(inputs: dict) -> list[torch.Tensor]:
    return [x for x in inputs.values() if isinstance(x, torch.Tensor) and x.requires_grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_all_masked_batch_is_zero_with_zero_grads(entry: str, reduction: str,
                                                  backend: str) -> None:
    fn, make = ENTRY_POINTS[entry]
    inputs = make()
    if entry == "fused_linear_divergence":
        inputs["student_bias"] = torch.randn(V, generator=_gen(3)).requires_grad_()
    labels = torch.full((B, T), -100)
    for options in (dict(), dict(token_weights=torch.rand(B, T) + 0.5, divergence="reverse_kl"),
                    dict(divergence="sampled"), dict(top_k=3, tail_bucket=True, clip=0.5)):
        loss = fn(**inputs, labels=labels, reduction=reduction, backend=backend, **options)
        assert loss.shape == ((B, T) if reduction == "none" else ())
        assert torch.equal(loss.detach(), torch.zeros_like(loss)), (options, loss)
        grads = torch.autograd.grad(loss.sum(), _params(inputs))
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad)), options


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fully_masked_sequence_does_not_poison_the_others(reduction: str) -> None:
    inputs = _linear_inputs()
    labels = _labels()
    labels[0] = -100
    loss = fused_linear_divergence(**inputs, labels=labels, reduction=reduction, backend="torch")
    grads = torch.autograd.grad(loss.sum(), _params(inputs))
    assert torch.isfinite(loss).all() and loss.detach().abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))  # the masked sequence
    assert grads[0][1].abs().sum() > 0


@pytest.mark.parametrize("reduction", REDUCTIONS[:3])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_empty_batch_is_zero(entry: str, reduction: str) -> None:
    """No tokens at all (an empty micro-batch): a zero loss, not a crash."""
    fn, make = ENTRY_POINTS[entry]
    inputs = {k: v.detach()[:, :0].requires_grad_(v.requires_grad) if v.dim() == 3 else v
              for k, v in make().items()}
    loss = fn(**inputs, reduction=reduction, backend="torch")
    assert loss.shape == ((B, 0) if reduction == "none" else ())
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    for grad in torch.autograd.grad(loss.sum(), _params(inputs), allow_unused=True):
        assert grad is None or torch.equal(grad, torch.zeros_like(grad))
