"""The GRPO baseline and opsd's mixed supervised term: the objective against a naive float64
oracle (plain forward of each [prompt ; response], full logits, autograd), TRL's GRPO loss on
the same rollouts, the advantages, and a few trainer steps that raise the probability of the
rewarded answers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_trainer_objective import _grads, _oracle, _role_logits, _setup
from trainer_fixtures import problems, small_config, small_model

from opsd_kernels.trainer import OPSDTrainer
from opsd_kernels.trainer.answers import group_advantages
from opsd_kernels.trainer.objective import RolloutBatch


def _advantages(count: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, generator=g).tolist()


def _grpo_oracle(model, batch, temperature: float) -> torch.Tensor:
    """TRL's dapo loss with one update per batch, in float64: -sum A_i log p(y_it) / tokens in
    gradient, and -sum A_i / tokens in value (the ratio is 1)."""
    logits = _role_logits(model, [p.student for p in batch.problems], batch) / temperature
    labels = torch.tensor([t for r in batch.responses for t in r])
    logp = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    per_token = torch.tensor([a for a, r in zip(batch.advantages, batch.responses, strict=True)
                              for _ in r], dtype=torch.float64)
    ratio = torch.exp(logp - logp.detach())
    return -(per_token * ratio).sum() / labels.numel()


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_objective_matches_the_oracle(tmp_path, shared_prefix, temperature) -> None:
    config, model, _, objective, batch = _setup(
        tmp_path, method="grpo", shared_prefix=shared_prefix, rollout_temperature=temperature)
    batch.advantages = _advantages(len(batch.responses), seed=3)
    loss, sums = objective(batch, torch.tensor(float(batch.num_tokens)))
    expected = _grpo_oracle(model, batch, temperature)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert sums["tokens"] == batch.num_tokens
    grads, want = _grads(model, loss), _grads(model, expected)
    assert any(g.abs().max() > 1e-4 for g in want.values())
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-6)


def test_grpo_objective_without_advantages_is_an_error(tmp_path) -> None:
    _, _, _, objective, batch = _setup(tmp_path, method="grpo")
    with pytest.raises(ValueError, match="no advantages"):
        objective(batch, torch.tensor(float(batch.num_tokens)))


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_sft_loss_weight_adds_the_reference_cross_entropy(tmp_path, weight) -> None:
    config, model, teacher, objective, batch = _setup(tmp_path, sft_loss_weight=weight)
    targets = RolloutBatch(batch.problems, [p.target for p in batch.problems], [0, 1, 2])
    loss, sums = objective(batch, torch.tensor(float(batch.num_tokens)), targets,
                           torch.tensor(float(targets.num_tokens)))
    distill, distill_grads = _oracle(config, model, teacher, batch)
    logits = _role_logits(model, [p.student for p in targets.problems], targets)
    labels = torch.tensor([t for r in targets.responses for t in r])
    cross_entropy = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss.double(), distill + weight * cross_entropy, rtol=1e-5,
                               atol=1e-7)
    grads, ce_grads = _grads(model, loss), _grads(model, cross_entropy)
    for name in ce_grads:
        torch.testing.assert_close(grads[name], distill_grads[name] + weight * ce_grads[name],
                                   rtol=1e-4, atol=1e-6)
    assert "sft_loss" in sums


def test_group_advantages_normalise_each_group() -> None:
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    got = torch.tensor(group_advantages(rewards, 3))
    r = torch.tensor(rewards).view(3, 3)
    want = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(got, want)
    assert got[3:6].abs().max() == 0  # a group of equal rewards teaches nothing
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages([1.0, 0.0, 1.0], 2)


def test_grpo_needs_two_rollouts_per_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.num_rollouts: grpo"):
        small_config(tmp_path, method="grpo", num_rollouts=1)
    with pytest.raises(ValueError, match="config.sft_loss_weight: applies to method opsd"):
        small_config(tmp_path, method="grpo", sft_loss_weight=0.5)


class _AnswerEngine:
    """Half the samples of each prompt box the right answer, half a wrong one."""

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], str]) -> None:
        self.tokenizer, self.answers = tokenizer, answers

    def texts(self, prompt) -> list[str]:
        right = self.answers[tuple(prompt)]
        return [f"\\boxed{{{right}}}", f"\\boxed{{{int(right) + 1}}}"]

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            for k in range(params.num_samples):
                text = self.texts(p)[k % 2]
                out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"]
                           + [self.tokenizer.eos_token_id])
        return out


def test_grpo_steps_raise_the_rewarded_answers_probability(tmp_path) -> None:
    model, tokenizer = small_model(seed=1)
    config = small_config(tmp_path, method="grpo", num_rollouts=2, max_steps=4,
                          learning_rate=3e-3, problems_per_step=2)
    rows = problems(2, seed=5)
    trainer = OPSDTrainer(model, tokenizer, rows, config)
    engine = _AnswerEngine(tokenizer, {tuple(p.student): p.answer
                                       for p in trainer.train_problems})
    trainer.engine = engine

    def margin() -> float:  # log p(right) - log p(wrong), summed over the problems
        total = 0.0
        with torch.no_grad():
            for p in trainer.train_problems:
                right, wrong = engine.generate([p.student], type("P", (), {"num_samples": 2}))
                batch = RolloutBatch([p], [right, wrong], [0, 0])
                logits = _role_logits(trainer.model, [p.student], batch)
                logp = torch.log_softmax(logits, -1).gather(
                    1, torch.tensor(right + wrong)[:, None]).squeeze(1)
                total += float(logp[:len(right)].sum() - logp[len(right):].sum())
        return total

    before = margin()
    history = trainer.train()
    assert all(h["accuracy"] == 0.5 for h in history)
    assert margin() > before + 1.0


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def test_grpo_matches_trl_grpo_loss(tmp_path) -> None:
    """TRL's GRPOTrainer._compute_loss (default dapo loss, beta 0, one update per generation)
    on the same prompts, completions and advantages: same loss and every gradient."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    temperature = 0.8
    _, model, _, objective, batch = _setup(tmp_path, method="grpo", shared_prefix=True,
                                           rollout_temperature=temperature)
    batch.advantages = _advantages(len(batch.responses), seed=4)
    pad = objective.pad_token_id
    prompts = [batch.problems[g].student for g in batch.group_index]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    longest = max(map(len, batch.responses))
    completion_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in batch.responses])
    completion_mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r))
                                    for r in batch.responses])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(
        batch.responses), num_generations=len(batch.responses), temperature=temperature,
        report_to=[], use_cpu=True, max_completion_length=longest, bf16=False)
    trainer = trl.GRPOTrainer(model=objective.model, reward_funcs=lambda **kw: [0.0],
                              args=args, train_dataset=datasets.Dataset.from_list(
                                  [{"prompt": "x"}]), processing_class=small_model()[1])
    trainer.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": torch.tensor(batch.advantages),
              "num_items_in_batch": torch.tensor(float(batch.num_tokens))}
    objective.model.train()
    expected = trainer._compute_loss(objective.model, inputs)
    want = _grads(objective.model, expected)
    loss, _ = objective(batch, torch.tensor(float(batch.num_tokens)))
    got = _grads(objective.model, loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
