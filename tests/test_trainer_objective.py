"""The trainer's objective against a naive oracle: the model's plain forward of every
[prompt ; response] sequence, full float64 logits, the reference divergence, autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from trainer_fixtures import problems, random_responses, small_config, small_model

from opsd_kernels.reference import reference_stats
from opsd_kernels.trainer.data import load_problems
from opsd_kernels.trainer.models import prepare_model
from opsd_kernels.trainer.objective import (
    DistillationObjective,
    RolloutBatch,
)
from opsd_kernels.trainer.prompts import PromptEncoder
from opsd_kernels.trainer.teacher import Teacher


def _setup(tmp_path, seed: int = 0, **overrides):
    config = small_config(tmp_path, **overrides)
    model, tokenizer = small_model(seed=seed)
    model = prepare_model(model, config)
    teacher = Teacher(config.teacher_mode, model, config.ema_decay)
    if config.teacher_mode == "ema":  # make the EMA weights differ from the student's
        with torch.no_grad():
            for e in teacher.ema:
                e.add_(0.05 * torch.randn_like(e))
    if config.lora:  # LoRA B starts at zero: give the adapters a value so "fixed" differs
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    encoder = PromptEncoder(tokenizer, config)
    encoded, _ = encoder.encode_all(load_problems(problems(3, seed)))
    n = config.num_rollouts
    responses = random_responses(len(tokenizer), tokenizer.eos_token_id, 3 * n, seed)
    batch = RolloutBatch(encoded, responses, [g for g in range(3) for _ in range(n)])
    objective = DistillationObjective(model, teacher, config, tokenizer.pad_token_id)
    return config, model, teacher, objective, batch


def _role_logits(model, prompts, batch) -> torch.Tensor:
    """[tokens, V] float64 logits predicting each response token, one plain forward per row."""
    rows = []
    for g, response in zip(batch.group_index, batch.responses, strict=True):
        ids = torch.tensor([prompts[g] + response])
        logits = model(input_ids=ids).logits[0].double()
        start = len(prompts[g]) - 1
        rows.append(logits[start:start + len(response)])
    return torch.cat(rows)


def _oracle(config, model, teacher, batch) -> tuple[torch.Tensor, dict]:
    labels = torch.tensor([t for r in batch.responses for t in r])
    with torch.no_grad(), teacher.weights():
        teacher_logits = _role_logits(model, [p.teacher for p in batch.problems], batch)
    student_logits = _role_logits(model, [p.student for p in batch.problems], batch)
    stats = reference_stats(student_logits, teacher_logits, labels,
                            divergence=config.divergence, beta=config.beta,
                            temperature=config.loss_temperature, clip=config.clip)
    loss = stats["divergence"].sum() / labels.numel()
    return loss, _grads(model, loss)


def _grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: g.double() for n, g in zip(params, grads, strict=True)}


CASES = [
    {"teacher_mode": "current"},
    {"teacher_mode": "current", "divergence": "forward_kl", "clip": 0.05,
     "loss_temperature": 1.1},
    {"teacher_mode": "current", "divergence": "reverse_kl", "beta": 1.0},
    {"teacher_mode": "ema"},
    {"teacher_mode": "fixed", "lora": True, "lora_rank": 4},
    {"teacher_mode": "ema", "lora": True, "lora_rank": 4},
]


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared", "plain"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_objective_matches_the_naive_full_logits_loss(tmp_path, case, shared_prefix) -> None:
    config, model, teacher, objective, batch = _setup(tmp_path, shared_prefix=shared_prefix,
                                                      **case)
    num_items = torch.tensor(float(batch.num_tokens))
    loss, sums = objective(batch, num_items)
    grads = _grads(model, loss)
    ref_loss, ref_grads = _oracle(config, model, teacher, batch)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    assert int(sums["tokens"]) == batch.num_tokens
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())


def test_teacher_weights_are_restored_and_differ(tmp_path) -> None:
    """The oracle above would pass for a teacher equal to the student; check it is not."""
    _, model, teacher, objective, batch = _setup(tmp_path, teacher_mode="ema")
    before = [p.detach().clone() for p in model.parameters()]
    loss_ema, _ = objective(batch, torch.tensor(float(batch.num_tokens)))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    teacher.mode = "current"
    loss_current, _ = objective(batch, torch.tensor(float(batch.num_tokens)))
    assert abs(loss_ema.item() - loss_current.item()) > 1e-4


def test_shared_head_is_used_when_the_teacher_shares_weights(tmp_path, monkeypatch) -> None:
    import opsd_kernels.trainer.objective as module

    _, _, _, objective, batch = _setup(tmp_path, teacher_mode="current")
    calls = []
    real = module.extend_prefix
    monkeypatch.setattr(module, "extend_prefix",
                        lambda *a, **k: calls.append(k["detach_base"]) or real(*a, **k))
    objective(batch, torch.tensor(float(batch.num_tokens)))
    assert calls == [True, False]  # the teacher reads the head detached, the student doesn't
    assert all(p.head_length > 0 for p in batch.problems)


def test_sft_objective_is_cross_entropy_on_the_targets(tmp_path) -> None:
    config, model, _, objective, batch = _setup(tmp_path, method="sft")
    batch = RolloutBatch(batch.problems, [p.target for p in batch.problems], [0, 1, 2])
    loss, _ = objective(batch, torch.tensor(float(batch.num_tokens)))
    logits = _role_logits(model, [p.student for p in batch.problems], batch)
    labels = torch.tensor([t for r in batch.responses for t in r])
    ref = F.cross_entropy(logits, labels, reduction="sum") / labels.numel()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    grads, ref_grads = _grads(model, loss), _grads(model, ref)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)
