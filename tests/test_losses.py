"""`fused_linear_divergence`, `divergence` and `divergence_stats` against the float64 oracle.

Loss, every gradient (student hidden, trainable weight, student bias; none for the teacher) and
every per-token stat. The PyTorch backend gets the full sweep (it is fast); the Triton backend,
which runs under the interpreter on CPU, a covering subset at smaller sizes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BACKENDS,
    DEVICE,
    HAS_TRITON,
    LOW_PRECISION,
    assert_close,
    assert_fa_rule,
    compare_results,
    gpu,
    make_fused_inputs,
    make_logits_inputs,
    reference_divergence,
    reference_fused,
    requires_gpu,
    run_divergence,
    run_fused,
    upstream_grad,
)

from opsd_kernels import (
    FusedLinearDivergenceLoss,
    divergence,
    divergence_stats,
    fused_linear_divergence,
)
from opsd_kernels.types import STAT_NAMES

# (divergence, beta): TRL's jsd endpoints, the mixture, and the named divergences.
DIVERGENCES = [("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0),
               ("forward_kl", 0.5), ("reverse_kl", 0.5), ("sampled", 0.5)]

# Options of one call; "top_k" values are resolved against the vocab size by _resolve.
OPTION_SETS: dict[str, dict] = {
    "plain": {},
    "temperature": dict(temperature=0.7),
    "teacher_temperature": dict(temperature=1.3, teacher_temperature=0.8),
    "top_k_teacher": dict(top_k=9),
    "top_k_teacher_tail": dict(top_k=9, tail_bucket=True),
    "top_k_student": dict(top_k=9, top_k_source="student"),
    "top_k_student_tail": dict(top_k=9, top_k_source="student", tail_bucket=True),
    "clip_0.05": dict(clip=0.05),
    "clip_small": dict(clip=0.002),
    "softcap": dict(logit_softcap=3.0),
    "everything": dict(temperature=1.1, teacher_temperature=0.9, top_k=17, tail_bucket=True,
                       clip=0.001, logit_softcap=5.0),
}
# Peaked distributions, so that single per-vocab terms exceed a clip of 0.05 (JSD's are small).
PEAKED = {"clip_0.05": dict(logit_std=6.0), "everything": dict(logit_std=6.0)}
# Input variants: biases, a separate teacher head with another hidden size, token weights.
INPUT_SETS: dict[str, dict] = {
    "shared_head": {},
    "biases": dict(bias=True),
    "teacher_head": dict(teacher_hidden_size=24),
    "token_weights": dict(token_weights=True),
}


def _valid(kind: str, options: dict) -> bool:
    return kind != "sampled" or not ({"top_k", "clip"} & options.keys())


def _div_opts(kind: str, beta: float) -> dict:
    return dict(divergence=kind, beta=beta)


def _div_id(kind: str, beta: float) -> str:
    return f"jsd{beta}" if kind == "jsd" else kind


def _cases(torch_all: bool, pairs) -> list:
    """Every (divergence, option) pair on torch; on Triton, each option with three
    divergences, cycling so that every divergence meets several options."""
    cases, turn = [], 0
    for opt_name, options in pairs.items():
        divs = [d for d in DIVERGENCES if _valid(d[0], options)]
        for d in divs if torch_all else []:
            cases.append(pytest.param("torch", *d, opt_name, id=f"torch-{_div_id(*d)}-{opt_name}"))
        for _ in range(3 if HAS_TRITON else 0):
            d = divs[turn % len(divs)]
            turn += 1
            cases.append(pytest.param("triton", *d, opt_name,
                                      id=f"triton-{_div_id(*d)}-{opt_name}"))
    return cases


def _size(backend: str) -> dict:
    # The interpreter costs ~60 ms per row and pass: keep Triton cases to a dozen rows.
    return dict(token_shape=(37,)) if backend == "torch" else dict(token_shape=(11,))


def _chunk(backend: str) -> int:
    return 8 if backend == "torch" else 4  # smaller than N and not dividing it


# --- fused_linear_divergence: divergences x options --------------------------------------------


@pytest.mark.parametrize("backend, kind, beta, opt_name", _cases(True, OPTION_SETS))
def test_fused_matches_reference(seed, backend, kind, beta, opt_name):
    options = dict(OPTION_SETS[opt_name], **_div_opts(kind, beta))
    inp = make_fused_inputs(seed, **_size(backend), **PEAKED.get(opt_name, {}))
    up = upstream_grad(seed, "mean", inp.token_shape)
    ours = run_fused(inp, backend=backend, upstream=up, chunk_size=_chunk(backend), **options)
    ref = reference_fused(inp, upstream=up, **options)
    compare_results(ours, ref)
    if "clip" in options:  # the case must exercise clipping
        unclipped = reference_fused(inp, **{k: x for k, x in options.items() if k != "clip"})
        assert (unclipped.stats["divergence"] - ref.stats["divergence"]).abs().max() > 1e-4


@pytest.mark.parametrize("input_name", list(INPUT_SETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_input_variants(seed, backend, input_name):
    """Biases (student bias trainable), a separate teacher head of another hidden size, token
    weights; crossed with JSD and forward KL under a temperature."""
    inp = make_fused_inputs(seed, **_size(backend), **INPUT_SETS[input_name])
    for kind, beta in [("jsd", 0.3), ("forward_kl", 0.5)]:
        options = dict(divergence=kind, beta=beta, temperature=1.2)
        up = upstream_grad(seed, "mean", inp.token_shape)
        ours = run_fused(inp, backend=backend, upstream=up, chunk_size=_chunk(backend), **options)
        compare_results(ours, reference_fused(inp, upstream=up, **options))
        if backend == "triton":
            break


@pytest.mark.parametrize("tail_bucket", [False, True], ids=["renormalised", "tail"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_equal_to_vocab_is_full_vocab(seed, backend, tail_bucket):
    """top_k = V keeps every token: the same loss, gradients and stats as no top-k (the tail
    bucket is then empty and must contribute exactly nothing, not NaN)."""
    inp = make_fused_inputs(seed, token_shape=(9,), vocab=61)
    options = dict(divergence="jsd", beta=0.5, temperature=0.9)
    up = upstream_grad(seed, "mean", inp.token_shape)
    ours = run_fused(inp, backend=backend, upstream=up, top_k=inp.vocab, tail_bucket=tail_bucket,
                     **options)
    compare_results(ours, reference_fused(inp, upstream=up, **options))


# --- reductions, token weights, num_items, masks -----------------------------------------------

REDUCTION_CASES = [
    ("mean", None), ("mean", "float"), ("mean", "tensor"), ("sum", None), ("none", None),
    ("sequence_mean", None), ("sequence_mean", "float"), ("sequence_mean", "tensor"),
]


def _num_items(variant: str | None):
    if variant == "float":
        return 13.0
    if variant == "tensor":
        return torch.tensor(17.0, device=DEVICE)
    return None


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction, num_items", REDUCTION_CASES,
                         ids=[f"{r}-{n}" for r, n in REDUCTION_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(seed, backend, reduction, num_items, weighted):
    # [B, T, H] input; one sequence entirely masked (sequence_mean must not count it).
    shape = (3, 7) if backend == "torch" else (3, 4)
    inp = make_fused_inputs(seed, token_shape=shape, token_weights=weighted, empty_sequence=True)
    options = dict(divergence="jsd", beta=0.4, temperature=1.1)
    up = upstream_grad(seed, reduction, inp.token_shape)
    kw = dict(reduction=reduction, num_items=_num_items(num_items), upstream=up, **options)
    ours = run_fused(inp, backend=backend, chunk_size=5, **kw)
    ref = reference_fused(inp, **kw)
    assert ours.loss.shape == (shape if reduction == "none" else ())
    compare_results(ours, ref)


@pytest.mark.parametrize("ignore_index", [-1, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(seed, backend, ignore_index):
    inp = make_fused_inputs(seed, **_size(backend), ignore_index=ignore_index, mask_frac=0.4)
    assert (inp.labels == ignore_index).any()
    up = upstream_grad(seed, "mean", inp.token_shape)
    for kind in ("jsd", "sampled"):
        kw = dict(divergence=kind, ignore_index=ignore_index, upstream=up)
        ours = run_fused(inp, backend=backend, **kw)
        compare_results(ours, reference_fused(inp, **kw))
        masked = inp.labels == ignore_index
        for name in STAT_NAMES:
            assert (ours.stats[name][masked] == 0).all(), name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence_mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked(seed, backend, reduction):
    """Every token ignored: loss exactly 0, gradients exactly 0 (not NaN), stats 0."""
    inp = make_fused_inputs(seed, token_shape=(2, 3), bias=True)
    inp = inp.with_(labels=torch.full_like(inp.labels, -100))
    for kind, options in [("jsd", dict(top_k=5, tail_bucket=True)), ("sampled", {}),
                          ("forward_kl", dict(clip=0.05))]:
        ours = run_fused(inp, backend=backend, reduction=reduction, divergence=kind,
                         upstream=upstream_grad(seed, reduction, inp.token_shape), **options)
        assert (ours.loss == 0).all()
        for name, g in ours.grads.items():
            if name in inp.trainable:
                assert g is not None and (g == 0).all(), name
        for name in STAT_NAMES:
            assert (ours.stats[name] == 0).all(), name
        logits = make_logits_inputs(seed, token_shape=(2, 3), vocab=33)
        logits.labels = torch.full((2, 3), -100, device=DEVICE)
        res = run_divergence(logits, backend=backend, reduction=reduction, divergence=kind,
                             upstream=upstream_grad(seed, reduction, (2, 3)), **options)
        assert (res.loss == 0).all() and (res.grads["student_logits"] == 0).all()


@pytest.mark.parametrize("backend, chunk_size", [("torch", c) for c in (1, 5, 37, 64, None)]
                         + ([("triton", 3)] if HAS_TRITON else []))
def test_chunk_sizes(seed, backend, chunk_size):
    inp = make_fused_inputs(seed, **_size(backend), bias=True)
    for kind, options in [("jsd", dict(beta=0.7)), ("reverse_kl", dict(top_k=7))]:
        up = upstream_grad(seed, "mean", inp.token_shape)
        ours = run_fused(inp, backend=backend, chunk_size=chunk_size, upstream=up,
                         divergence=kind, **options)
        compare_results(ours, reference_fused(inp, upstream=up, divergence=kind, **options))


def test_odd_shapes_large_vocab(seed):
    """37 x 1013 tokens x vocab, 3-D [B, T, H] input, hidden size 40 (torch backend)."""
    inp = make_fused_inputs(seed, token_shape=(1, 37), hidden=40, vocab=1013, bias=True,
                            token_weights=True)
    options = dict(divergence="jsd", beta=0.25, temperature=0.8, top_k=31, tail_bucket=True)
    up = upstream_grad(seed, "sum", inp.token_shape)
    ours = run_fused(inp, backend="torch", reduction="sum", chunk_size=6, upstream=up, **options)
    compare_results(ours, reference_fused(inp, reduction="sum", upstream=up, **options))


# --- which leaves get gradients ----------------------------------------------------------------


@pytest.mark.parametrize("trainable", [("student_hidden",), ("weight",),
                                       ("student_hidden", "student_bias")],
                         ids=["hidden_only", "weight_only", "hidden_and_bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_leaves_get_no_grad(seed, backend, trainable):
    """Frozen weight (LoRA): no weight gradient; the gradients that are asked for still match."""
    inp = make_fused_inputs(seed, **_size(backend), bias=True).with_(trainable=trainable)
    up = upstream_grad(seed, "mean", inp.token_shape)
    ours = run_fused(inp, backend=backend, upstream=up, divergence="reverse_kl", clip=0.05)
    for name in ("student_hidden", "weight", "student_bias"):
        assert (ours.grads[name] is None) == (name not in trainable), name
    compare_results(ours, reference_fused(inp, upstream=up, divergence="reverse_kl", clip=0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_grad(seed, backend):
    """A separate teacher head and bias that require grad still get none: the teacher is a
    fixed target; and with a shared head the weight gradient has only the student's part
    (checked against the oracle, which detaches the teacher's logits)."""
    inp = make_fused_inputs(seed, **_size(backend), teacher_hidden_size=12, bias=True)
    inp = inp.with_(trainable=("student_hidden", "weight", "student_bias", "teacher_weight",
                               "teacher_bias"))
    up = upstream_grad(seed, "mean", inp.token_shape)
    ours = run_fused(inp, backend=backend, upstream=up)
    assert ours.grads["teacher_weight"] is None and ours.grads["teacher_bias"] is None
    assert ours.grads["teacher_hidden"] is None
    compare_results(ours, reference_fused(inp, upstream=up))


def test_no_grad_mode_builds_no_graph(seed):
    inp = make_fused_inputs(seed)
    h = inp.student_hidden.float().requires_grad_()
    with torch.no_grad():
        loss = fused_linear_divergence(h, inp.weight.float(), inp.teacher_hidden.float(),
                                       labels=inp.labels)
    assert not loss.requires_grad


# --- reduction="none": per-token losses, backward recomputes -----------------------------------

NONE_CASES = [("jsd", 0.5, {}), ("forward_kl", 0.5, dict(clip=0.05, temperature=1.3)),
              ("sampled", 0.5, {}), ("reverse_kl", 0.5, dict(top_k=11, tail_bucket=True))]


@pytest.mark.parametrize("kind, beta, options", NONE_CASES, ids=[c[0] for c in NONE_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_backward(seed, backend, kind, beta, options):
    """(loss * random).sum().backward(): the per-token op recomputes a sweep with
    coef = grad_output in its backward; gradients must match the oracle's."""
    options = dict(options, divergence=kind, beta=beta)
    inp = make_fused_inputs(seed, token_shape=(2, 5) if backend == "triton" else (4, 9),
                            bias=True, token_weights=True)
    up = upstream_grad(seed, "none", inp.token_shape)
    ours = run_fused(inp, backend=backend, reduction="none", upstream=up, chunk_size=3, **options)
    compare_results(ours, reference_fused(inp, reduction="none", upstream=up, **options))
    logits = make_logits_inputs(seed, token_shape=inp.token_shape, vocab=129, token_weights=True)
    ours = run_divergence(logits, backend=backend, reduction="none", upstream=up, chunk_size=3,
                          **options)
    compare_results(ours, reference_divergence(logits, reduction="none", upstream=up, **options))


# --- low precision: the flash-attention rule ---------------------------------------------------

LOW_CASES = [("jsd", 0.5, {}), ("forward_kl", 0.5, dict(temperature=1.1)),
             ("reverse_kl", 0.5, {}), ("sampled", 0.5, {}), ("jsd", 0.1, dict(clip=0.05)),
             ("jsd", 0.9, dict(logit_softcap=4.0))]


UNIT_GRAD = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)


def _low_cases():
    cases = []
    for dtype in LOW_PRECISION:
        for kind, beta, options in LOW_CASES:
            cases.append(pytest.param("torch", dtype, kind, beta, options,
                                      id=f"torch-{str(dtype)[6:]}-{_div_id(kind, beta)}"))
    if HAS_TRITON:
        cases += [pytest.param("triton", torch.bfloat16, "jsd", 0.5, {}, id="triton-bf16-jsd"),
                  pytest.param("triton", torch.float16, "forward_kl", 0.5, dict(temperature=1.1),
                               id="triton-fp16-forward_kl")]
    return cases


@pytest.mark.parametrize("backend, dtype, kind, beta, options", _low_cases())
def test_low_precision_fused(seed, backend, dtype, kind, beta, options):
    """bf16 / fp16 hidden states and head: error vs float64 within 2x (forward) / 3x
    (backward) of plain PyTorch's (GEMM in the input dtype, fp32 softmax, autograd).
    grad_output is 1 here (a plain loss.backward()); a scaled grad_output in low precision is
    `test_fp16_gradients_survive_loss_scaling`."""
    options = dict(options, divergence=kind, beta=beta)
    inp = make_fused_inputs(seed, **_size(backend), dtype=dtype, bias=True)
    up = UNIT_GRAD
    ours = run_fused(inp, backend=backend, upstream=up, chunk_size=_chunk(backend), **options)
    ref = reference_fused(inp, upstream=up, **options)
    base = reference_fused(inp, logits_dtype=dtype, math_dtype=torch.float32, upstream=up,
                           **options)
    compare_results(ours, ref, dtype, baseline=base)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_logits(seed, backend, dtype):
    """bf16 / fp16 logits: the flash-attention rule against autograd on the upcast logits."""
    inp = make_logits_inputs(seed, token_shape=(2, 5) if backend == "triton" else (3, 11),
                             vocab=257, dtype=dtype)
    for kind, beta in [("jsd", 0.5), ("reverse_kl", 0.5)]:
        up = UNIT_GRAD
        opts = dict(divergence=kind, beta=beta, temperature=0.9)
        ours = run_divergence(inp, backend=backend, upstream=up, **opts)
        ref = reference_divergence(inp, upstream=up, **opts)
        base = reference_divergence(inp, logits_dtype=dtype, math_dtype=torch.float32,
                                    upstream=up, **opts)
        compare_results(ours, ref, dtype, baseline=base)
        if backend == "triton":
            break


@pytest.mark.parametrize("api", ["fused", "logits"])
def test_fp16_gradients_survive_loss_scaling(seed, api):
    """fp16 training multiplies the loss by a large scale (GradScaler starts at 2**16) so that
    small gradients do not underflow; with a global token count as num_items the unscaled
    per-element gradients are far below fp16's smallest normal (6e-5). Plain PyTorch computes
    the gradients already scaled; ours must be as good (flash-attention rule)."""
    dtype, scale, num_items = torch.float16, 2.0**16, 1e6
    up = torch.tensor(scale, dtype=torch.float64, device=DEVICE)
    opts = dict(divergence="jsd", beta=0.5, num_items=num_items, upstream=up)
    if api == "fused":
        inp = make_fused_inputs(seed, dtype=dtype)
        ours = run_fused(inp, backend="torch", **opts)
        ref = reference_fused(inp, **opts)
        base = reference_fused(inp, logits_dtype=dtype, math_dtype=torch.float32, **opts)
    else:
        inp = make_logits_inputs(seed, dtype=dtype)
        ours = run_divergence(inp, backend="torch", **opts)
        ref = reference_divergence(inp, **opts)
        base = reference_divergence(inp, logits_dtype=dtype, math_dtype=torch.float32, **opts)
    for name, g in ref.grads.items():
        if g is not None:
            assert_fa_rule(ours.grads[name], base.grads[name], g, backward=True,
                           what=f"grad of {name}")


# --- divergence(): the same loss from logits ---------------------------------------------------

LOGITS_OPTIONS = ["plain", "teacher_temperature", "top_k_teacher_tail", "top_k_student",
                  "clip_0.05", "softcap"]


@pytest.mark.parametrize("backend, kind, beta, opt_name",
                         _cases(True, {k: OPTION_SETS[k] for k in LOGITS_OPTIONS}))
def test_divergence_matches_reference(seed, backend, kind, beta, opt_name):
    options = dict(OPTION_SETS[opt_name], divergence=kind, beta=beta)
    shape = (3, 13) if backend == "torch" else (11,)
    inp = make_logits_inputs(seed, token_shape=shape, token_weights=True,
                             **PEAKED.get(opt_name, {}))
    up = upstream_grad(seed, "mean", shape)
    ours = run_divergence(inp, backend=backend, upstream=up, chunk_size=_chunk(backend),
                          **options)
    compare_results(ours, reference_divergence(inp, upstream=up, **options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_equals_fused(seed, backend):
    """The logits API on logits built from the hidden states gives the fused loss."""
    inp = make_fused_inputs(seed, **_size(backend), bias=True)
    f32 = {k: getattr(inp, k).float() for k in ("student_hidden", "weight", "teacher_hidden",
                                                 "student_bias", "teacher_bias")}
    z_s = torch.nn.functional.linear(f32["student_hidden"], f32["weight"], f32["student_bias"])
    z_t = torch.nn.functional.linear(f32["teacher_hidden"], f32["weight"], f32["teacher_bias"])
    opts = dict(labels=inp.labels, divergence="jsd", beta=0.6, temperature=1.2, backend=backend)
    from_logits = divergence(z_s, z_t, **opts)
    ours = run_fused(inp, backend=backend, divergence="jsd", beta=0.6, temperature=1.2)
    assert_close(from_logits, ours.loss)


# --- stats ---------------------------------------------------------------------------------------

STATS_CASES = [("no_labels", dict(divergence="jsd"), False),
               ("labels", dict(divergence="forward_kl", temperature=0.8), True),
               ("sampled", dict(divergence="sampled"), True),
               ("top_k_tail", dict(divergence="reverse_kl", top_k=6, tail_bucket=True), True)]


@pytest.mark.parametrize("name, options, labels", STATS_CASES, ids=[c[0] for c in STATS_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_stats(seed, backend, name, options, labels):
    """divergence_stats (no grad) and return_stats: every field vs the oracle; label
    log-probs are 0 without labels; the fields agree between the two entry points."""
    inp = make_fused_inputs(seed, token_shape=(2, 5), labels=labels, bias=True)
    ref = reference_fused(inp, **options)
    h = {}
    for k in ("student_hidden", "weight", "teacher_hidden", "student_bias", "teacher_bias"):
        x = getattr(inp, k)
        h[k] = None if x is None else x.float().requires_grad_(k == "student_hidden")
    stats = divergence_stats(h["student_hidden"], h["weight"], h["teacher_hidden"],
                             labels=inp.labels, student_bias=h["student_bias"],
                             teacher_bias=h["teacher_bias"], backend=backend, chunk_size=3,
                             **options)
    ours = run_fused(inp, backend=backend, **options)
    for field in STAT_NAMES:
        value = getattr(stats, field)
        assert value.shape == (2, 5) and value.dtype == torch.float32
        assert not value.requires_grad
        scale = max(ref.stats[field].abs().max().item(), 1.0)
        assert_close(value, ref.stats[field], scale=scale, what=field)
        assert_close(ours.stats[field], ref.stats[field], scale=scale, what=field)
        if not labels and field.endswith("logprob"):
            assert (value == 0).all()
    assert_close(ours.loss, ref.loss)


def test_module_matches_function(seed):
    inp = make_fused_inputs(seed, token_weights=True)
    options = dict(divergence="jsd", beta=0.3, temperature=1.1, top_k=20, backend="torch")
    module = FusedLinearDivergenceLoss(**options)
    f32 = [inp.student_hidden.float(), inp.weight.float(), inp.teacher_hidden.float()]
    loss = module(*f32, labels=inp.labels, token_weights=inp.token_weights)
    ref = reference_fused(inp, **{k: x for k, x in options.items() if k != "backend"})
    assert_close(loss, ref.loss)


# --- FusedLinearDivergenceLoss: options in the constructor, tensors per call -------------------


def _module_inputs() -> dict:
    b, t, hidden, vocab = 2, 3, 8, 37
    g = torch.Generator().manual_seed(21)
    return dict(
        student_hidden=torch.randn(b, t, hidden, generator=g).requires_grad_(),
        weight=torch.randn(vocab, hidden, generator=g).requires_grad_(),
        teacher_hidden=torch.randn(b, t, hidden + 2, generator=g),
        teacher_weight=torch.randn(vocab, hidden + 2, generator=g),
        labels=torch.tensor([[3, -100, 5], [0, 36, 2]]),
        token_weights=torch.rand(b, t, generator=g) + 0.5,
        student_bias=torch.randn(vocab, generator=g).requires_grad_(),
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


# --- GPU-only: realistic sizes and the out_dtype GEMM path --------------------------------------


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_realistic_sizes(seed, backend, dtype):
    """On CUDA the logits come from a bf16 / fp16 GEMM with an fp32 output: the
    flash-attention rule at a vocabulary and hidden size where rounding matters."""
    inp = make_fused_inputs(seed, token_shape=(4, 129), hidden=512, vocab=32003, dtype=dtype,
                            bias=True)
    options = dict(divergence="jsd", beta=0.5, temperature=1.1)
    up = UNIT_GRAD
    ours = run_fused(inp, backend=backend, upstream=up, chunk_size=100, **options)
    ref = reference_fused(inp, upstream=up, **options)
    base = reference_fused(inp, logits_dtype=dtype, math_dtype=torch.float32, upstream=up,
                           **options)
    compare_results(ours, ref, dtype, baseline=base)


def test_teacher_inputs_are_not_modified(seed):
    inp = make_fused_inputs(seed)
    h_t, w = inp.teacher_hidden.float(), inp.weight.float().requires_grad_()
    h_s = inp.student_hidden.float().requires_grad_()
    before = (h_t.clone(), w.detach().clone(), h_s.detach().clone())
    fused_linear_divergence(h_s, w, h_t, labels=inp.labels, backend="torch").backward()
    for a, b in zip((h_t, w.detach(), h_s.detach()), before, strict=True):
        assert torch.equal(a, b)

