"""The registered divergence ops (`opsd_kernels.divergence_library`): schemas written from the
one list of options, torch.library.opcheck on every op, and a training step under
torch.compile that matches plain autograd."""

from __future__ import annotations

import copy
import typing

import pytest
import torch
from conftest import HAS_TRITON
from torch import nn

from opsd_kernels import fused_linear_divergence
from opsd_kernels.divergence_library import (
    LINEAR_LOSS_INPUTS,
    LINEAR_ROWS_INPUTS,
    LOGITS_LOSS_INPUTS,
    LOGITS_ROWS_INPUTS,
    divergence_op,
    divergence_rows_op,
    fused_linear_divergence_op,
    fused_linear_divergence_rows_op,
)
from opsd_kernels.divergence_options import DivergenceOptions, OpInputs

N, H, V = 5, 8, 37
OPS = {
    "fused_linear_divergence": (fused_linear_divergence_op, LINEAR_LOSS_INPUTS),
    "fused_linear_divergence_rows": (fused_linear_divergence_rows_op, LINEAR_ROWS_INPUTS),
    "divergence": (divergence_op, LOGITS_LOSS_INPUTS),
    "divergence_rows": (divergence_rows_op, LOGITS_ROWS_INPUTS),
}
# The schema type each Python option type must have.
SCHEMA_TYPE = {str: "str", float: "float", int: "int", bool: "bool", float | None: "float?"}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).requires_grad_(grad)


def _labels(n: int, vocab: int = V, seed: int = 7) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=_gen(seed))
    labels[1] = -100
    return labels


# --- schemas ------------------------------------------------------------------------------------


def _schema_type(declared: str) -> str:
    """A schema type as the registered op reports it (\"Tensor?\" reads Optional[Tensor])."""
    return str(torch._C.parse_schema(f"f({declared} x) -> ()").arguments[0].type)


@pytest.mark.parametrize("name", list(OPS))
def test_schema_options_are_the_option_list(name: str) -> None:
    """Every op takes DivergenceOptions' fields, in order and typed as declared, right after
    its tensors; its flags are booleans after them."""
    op, inputs = OPS[name]
    args = op._opoverload._schema.arguments
    tensors, options = args[:len(inputs.tensors)], args[len(inputs.tensors):]
    flags = options[len(DivergenceOptions._fields):]
    options = options[:len(DivergenceOptions._fields)]
    hints = typing.get_type_hints(DivergenceOptions)
    assert [a.name for a in options] == list(DivergenceOptions._fields)
    assert [str(a.type) for a in options] == [_schema_type(SCHEMA_TYPE[hints[name]])
                                              for name in DivergenceOptions._fields]
    assert [(a.name, str(a.type)) for a in tensors] == [
        (name, _schema_type(kind)) for name, kind in inputs.tensors.items()]
    assert set(inputs.tensors.values()) <= {"Tensor", "Tensor?"}
    assert [(a.name, str(a.type)) for a in flags] == [(f, "bool") for f in inputs.flags]
    assert [a.name for a in args] == list(inputs.names)


def test_op_inputs_pack_by_name_and_place_gradients() -> None:
    inputs = OpInputs({"x": "Tensor", "y": "Tensor?"}, flags=("need_x",))
    options = DivergenceOptions(kind="reverse_kl", clip=0.5)
    x = torch.ones(2)
    packed = inputs.pack(options, need_x=True, y=None, x=x)
    assert packed == (x, None, *options, True)
    assert inputs.options(packed) == options
    assert inputs.parse(packed).need_x is True
    assert inputs.grads(y=x) == (None, x) + (None,) * (len(inputs.names) - 2)
    with pytest.raises(TypeError, match=r"missing \['need_x'\]"):
        inputs.pack(options, x=x, y=None)
    with pytest.raises(TypeError, match=r"unknown \['z'\]"):
        inputs.pack(options, x=x, y=None, need_x=True, z=1)
    with pytest.raises(TypeError, match="not tensors of this op"):
        inputs.grads(kind=x)


# --- torch.library.opcheck ----------------------------------------------------------------------

# Option sets by name; every field not given keeps DivergenceOptions' default.
OPTION_SETS = {
    "jsd": DivergenceOptions(kind="jsd", beta=0.5),
    "fkl_topk_tail": DivergenceOptions(kind="forward_kl", beta=0.0, temperature=0.8,
                                       teacher_temperature=1.2, top_k=4, top_k_source="student",
                                       tail_bucket=True),
    "rkl_clip_softcap": DivergenceOptions(kind="reverse_kl", beta=1.0, temperature=1.1,
                                          teacher_temperature=1.1, clip=0.05, softcap=3.0),
    "sampled": DivergenceOptions(kind="sampled"),
}


def _options(name: str, chunk_size: int, backend: str = "torch") -> DivergenceOptions:
    return OPTION_SETS[name]._replace(backend=backend, chunk_size=chunk_size)


def _opcheck(op, args: tuple) -> None:
    torch.library.opcheck(op, args, raise_exception=True)


def _linear_tensors(optional: bool) -> dict:
    return dict(
        student_hidden=_randn(N, H, seed=1, grad=True),
        weight=_randn(V, H, seed=2, grad=True),
        teacher_hidden=_randn(N, H + 3 if optional else H, seed=3),
        teacher_weight=_randn(V, H + 3, seed=4) if optional else None,
        labels=_labels(N) if optional else None,
        student_bias=_randn(V, seed=5, grad=True) if optional else None,
        teacher_bias=_randn(V, seed=6) if optional else None,
    )


def _coef() -> torch.Tensor:
    return torch.rand(N, generator=_gen(8))


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
    tensors = _linear_tensors(optional or name == "sampled")
    _opcheck(fused_linear_divergence_op, LINEAR_LOSS_INPUTS.pack(
        _options(name, 2), **tensors, coef=_coef(), need_grad_h=need_h, need_grad_w=need_w,
        need_grad_bs=need_bs))


@pytest.mark.parametrize("name,optional", [("jsd", True), ("jsd", False),
                                           ("fkl_topk_tail", False), ("rkl_clip_softcap", True),
                                           ("sampled", True)])
def test_opcheck_fused_linear_divergence_rows(name: str, optional: bool) -> None:
    _opcheck(fused_linear_divergence_rows_op,
             LINEAR_ROWS_INPUTS.pack(_options(name, 0), **_linear_tensors(optional)))


def _logits(with_labels: bool) -> dict:
    return dict(student_logits=_randn(N, V, seed=11, grad=True),
                teacher_logits=_randn(N, V, seed=12),
                labels=_labels(N) if with_labels else None)


@pytest.mark.parametrize("name,with_labels,need_grad", [
    ("jsd", True, True), ("jsd", False, True), ("jsd", True, False),
    ("fkl_topk_tail", False, True), ("rkl_clip_softcap", True, True), ("sampled", True, True),
])
def test_opcheck_divergence(name: str, with_labels: bool, need_grad: bool) -> None:
    _opcheck(divergence_op, LOGITS_LOSS_INPUTS.pack(
        _options(name, 3), **_logits(with_labels), coef=_coef(), need_grad=need_grad))


@pytest.mark.parametrize("name,with_labels", [("jsd", True), ("jsd", False),
                                              ("fkl_topk_tail", True), ("sampled", True)])
def test_opcheck_divergence_rows(name: str, with_labels: bool) -> None:
    _opcheck(divergence_rows_op, LOGITS_ROWS_INPUTS.pack(_options(name, 0),
                                                         **_logits(with_labels)))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not usable here")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's -inf - -inf lanes
def test_opcheck_triton_backend() -> None:
    """Every op once through the Triton row step (interpreted on CPU)."""
    opts = _options("jsd", 3, backend="triton")
    _opcheck(fused_linear_divergence_op, LINEAR_LOSS_INPUTS.pack(
        opts, **_linear_tensors(True), coef=_coef(), need_grad_h=True, need_grad_w=True,
        need_grad_bs=True))
    _opcheck(fused_linear_divergence_rows_op,
             LINEAR_ROWS_INPUTS.pack(opts, **_linear_tensors(False)))
    _opcheck(divergence_op, LOGITS_LOSS_INPUTS.pack(opts, **_logits(True), coef=_coef(),
                                                    need_grad=True))
    _opcheck(divergence_rows_op, LOGITS_ROWS_INPUTS.pack(opts, **_logits(False)))


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


@pytest.mark.parametrize("use_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
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
