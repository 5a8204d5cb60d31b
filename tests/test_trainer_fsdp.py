"""The trainer under FSDP2: two processes (gloo on CPU) started by `accelerate launch` with the
shipped configs/fsdp2.yaml run every case of tests/fsdp_train_worker.py in one launch; this
file computes the same in one process and compares (fp32, relative 1e-5; bf16 as below).

- one micro-batch's loss and the whole (gathered) gradient of every trainable parameter, for a
  frozen head (LoRA) and a trainable one, tied and untied embeddings, shared prefixes on and off,
  and once with gradient checkpointing;
- two optimizer steps with the EMA teacher and two accumulated micro-batches: losses, every
  parameter (the same on both processes) and the EMA;
- the same run stopped after one step and resumed from its checkpoint: the next loss and the
  final weights, and the final/ model rank 0 wrote; its checkpoint resumed by 1 FSDP2 process,
  and that process's next checkpoint by 2 (resharded: the same loss, weights and EMA as
  without interruption), and refused by one unsharded process;
- two steps under ``--mixed_precision bf16`` (another launch): their error from the fp32 run of
  the same order as one process's bf16 error (`assert_bf16_matches_one_process`);
- greedy evaluation with one process holding fewer problems, and a step on sampled rollouts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_train_worker import (
    GLOBAL_PROBLEMS,
    GRADIENT_CASES,
    fixed_batch,
    gradient_config,
    steps_config,
)
from trainer_fixtures import (
    FixedResponses,
    mixed_precision,
    problems,
    small_config,
    small_model,
)

from opsd_kernels.trainer import OPSDTrainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "fsdp_train_worker.py"
CONFIG = ROOT / "opsd_kernels" / "trainer" / "configs" / "fsdp2.yaml"
RTOL = 1e-5
pytestmark = pytest.mark.slow  # two processes under accelerate launch


def _launch(out: Path, precision: str = "no", *cases: str, processes: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
         "--num_processes", str(processes), "--mixed_precision", precision,
         "--main_process_port", str(29300 + os.getpid() % 1000), str(WORKER), str(out),
         *([",".join(cases)] if cases else [])],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Every case under FSDP2 with 2 processes; the folder of their results."""
    out = tmp_path_factory.mktemp("fsdp")
    _launch(out)
    return out


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory) -> Path:
    """The steps case under ``--mixed_precision bf16`` (FSDP2's MixedPrecisionPolicy)."""
    out = tmp_path_factory.mktemp("fsdp-bf16")
    _launch(out, "bf16", "steps")
    return out


def _result(out: Path, case: str, rank: int = 0) -> dict:
    result = torch.load(out / f"{case}-rank{rank}.pt", weights_only=False)
    assert result["world"] == 2
    return result


def _close(actual, expected, what: str) -> None:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=RTOL * scale,
                               msg=lambda m: f"{what}: {m}")


def _close_all(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys() and expected, what
    for name, value in expected.items():
        _close(actual[name], value, f"{what} {name}")


def _trainable(trainer: OPSDTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_loss_and_gradients_match_one_process(sharded, tmp_path, case) -> None:
    lora, tied, *options = GRADIENT_CASES[case]
    result = _result(sharded, case)
    # Sharded for real: each layer, the embeddings and the head are FSDP2 units.
    assert {"FSDPDistillationObjective", "FSDPQwen3DecoderLayer", "FSDPLinear",
            "FSDPEmbedding"} <= set(result["units"]), result["units"]
    model, tokenizer = small_model(tie_word_embeddings=tied)
    with torch.random.fork_rng():
        torch.manual_seed(1)  # LoRA's initial A, as in the worker
        trainer = OPSDTrainer(model, tokenizer, problems(8), gradient_config(tmp_path, lora,
                                                                               *options))
    batch = fixed_batch(trainer, 0, GLOBAL_PROBLEMS)
    loss, _ = trainer.objective(batch, torch.tensor(float(batch.num_tokens)))
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    _close(result["loss"], loss, "loss")
    _close_all(result["grads"], grads, "gradient of")
    head = trainer.model.get_output_embeddings().weight
    assert head.requires_grad != lora and any(g.abs().max() > 0 for g in grads.values())


def _steps_reference(tmp_path: Path, **overrides) -> tuple[list[float], OPSDTrainer]:
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8), steps_config(tmp_path, 1, **overrides),
                          rollout_engine=FixedResponses(len(tokenizer), tokenizer.eos_token_id))
    return [h["loss"] for h in trainer.train()], trainer


def test_steps_with_the_ema_teacher_match_one_process(sharded, tmp_path) -> None:
    ranks = [_result(sharded, "steps", r) for r in (0, 1)]
    losses, trainer = _steps_reference(tmp_path)
    _close(ranks[0]["losses"], losses, "losses")
    assert_weights_match_one_process(ranks, trainer)


def assert_weights_match_one_process(ranks: list[dict], trainer: OPSDTrainer) -> None:
    """Both processes hold the same weights after the steps, equal to the one-process run's
    (``trainer``), with the same EMA, and the steps changed some weight."""
    for name, value in ranks[0]["params"].items():  # the gathered weights agree exactly
        assert torch.equal(value, ranks[1]["params"][name]), name
    result = ranks[0]
    _close_all(result["params"], _trainable(trainer), "parameter")
    expected_ema = dict(zip(_trainable(trainer), trainer.teacher.state_dict()["ema"],
                            strict=True))
    _close_all(dict(zip(result["params"], result["ema"], strict=True)), expected_ema, "EMA of")
    moved = [n for n, p in small_model()[0].named_parameters()
             if not torch.equal(p, result["params"][n])]
    assert moved, "the steps changed no weight"


BF16_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits
BF16_FACTOR = 3


def test_bf16_steps_match_one_process_to_bf16_precision(sharded_bf16, tmp_path) -> None:
    ranks = [_result(sharded_bf16, "steps", r) for r in (0, 1)]
    # accelerate's bf16 under FSDP2: bf16 weights gathered, gradients reduce-scattered in bf16
    assert ranks[0]["param_dtype"] == ranks[0]["reduce_dtype"] == torch.bfloat16
    assert_bf16_matches_one_process(ranks, _steps_reference, tmp_path)


def assert_bf16_matches_one_process(ranks: list[dict], reference, tmp_path: Path,
                                    learning_rate: float = 1e-2) -> None:
    """The sharded bf16 steps (``ranks``) err from the one-process fp32 run by as much as the
    one-process bf16 run (accelerate's bf16 there: autocast) does: ``reference(path)`` gives a
    run's losses and trainer.

    Tolerance: bf16 rounds to u = 2^-8 relative. The first loss (no update yet) is one bf16
    forward: within 4u of fp32's. After that the error is not a rounding: Adam's first update
    is lr * g / |g| per weight, so where bf16 rounding flips a small gradient's sign a weight
    moves 2 * lr the other way; after two steps single weights of either bf16 run sit up to ~4
    * lr from fp32's (0.04 here, in both), so weights are compared by the RMS of their
    difference over all trainable elements (and the losses and EMA likewise). The sharded run
    rounds elsewhere than the one-process one (its weights are bf16 copies, its reductions
    bf16, where autocast keeps fp32 weights and sums), so it is held to the same order: its
    RMS error within a factor BF16_FACTOR of the one-process bf16 error, either way (the lower
    bound shows bf16 took effect; fp32 runs agree to 1e-5), plus u * lr (one rounding of one
    update) in absolute terms."""
    for name, value in ranks[0]["params"].items():  # the gathered weights agree exactly
        assert torch.equal(value, ranks[1]["params"][name]), name

    def flat(losses, params, ema) -> list[torch.Tensor]:
        return [torch.tensor(losses, dtype=torch.float64),
                torch.cat([p.flatten().double() for p in params.values()]),
                torch.cat([e.flatten().double() for e in ema])]

    def run(path: Path) -> list[torch.Tensor]:
        losses, trainer = reference(path)
        return flat(losses, _trainable(trainer), trainer.teacher.state_dict()["ema"])

    fp32 = run(tmp_path / "fp32")
    with mixed_precision("bf16"):
        single = run(tmp_path / "bf16")
    sharded = flat(ranks[0]["losses"], ranks[0]["params"], ranks[0]["ema"])
    first = fp32[0][0].abs()
    assert (sharded[0][0] - fp32[0][0]).abs() <= 4 * BF16_ROUNDOFF * first
    for what, ours, one, exact in zip(("losses", "weights", "EMA"), sharded, single, fp32,
                                      strict=True):
        error, expected = (ours - exact).pow(2).mean().sqrt(), (one - exact).pow(2).mean().sqrt()
        assert expected > 100 * RTOL * exact.abs().max(), f"{what}: the reference ran in fp32"
        assert expected / BF16_FACTOR <= error <= (
            BF16_FACTOR * expected + BF16_ROUNDOFF * learning_rate), (what, error, expected)


def test_resume_repeats_the_next_step_and_rank_0_writes_the_model(sharded) -> None:
    from transformers import AutoModelForCausalLM

    steps, resumed = _result(sharded, "steps"), _result(sharded, "resume")
    first, second = resumed["losses"]
    assert len(first) == 1 and len(second) == 1  # the second run started at step 1
    _close(first + second, steps["losses"], "losses of the interrupted and resumed run")
    _close_all(resumed["params"], steps["params"], "resumed parameter")
    checkpoint = sharded / "resume" / "run" / "checkpoints" / "checkpoint_1"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").exists()  # the sharded state
    final = AutoModelForCausalLM.from_pretrained(sharded / "resume" / "run" / "final")
    _close_all({n: p for n, p in final.named_parameters()}, resumed["params"], "saved")


def _resharded(saved: Path, out: Path, processes: int) -> dict:
    """The steps run resumed from ``saved`` by ``processes`` FSDP2 processes."""
    shutil.copytree(saved, out / "reshard" / "run" / "checkpoints" / saved.name)
    _launch(out, "no", "reshard", processes=processes)
    result = torch.load(out / "reshard-rank0.pt", weights_only=False)
    assert result["world"] == processes and result["sharded"]
    return result


def test_a_checkpoint_resumes_on_another_number_of_fsdp2_processes(sharded, tmp_path) -> None:
    """torch.distributed.checkpoint reshards the model and optimizer state on load. The
    2-process checkpoint of step 1, resumed by 1 process: step 2's loss, the weights (Adam's
    moments included: a fresh optimizer would move them by ~lr) and the EMA equal the
    uninterrupted 2-process run's; that process's checkpoint of step 2, resumed by 2: step 3
    equals the one-process run of three steps."""
    steps = _result(sharded, "steps")
    one = _resharded(sharded / "resume" / "run" / "checkpoints" / "checkpoint_1",
                     tmp_path / "to-1", processes=1)
    two = _resharded(tmp_path / "to-1" / "reshard" / "run" / "checkpoints" / "checkpoint_2",
                     tmp_path / "to-2", processes=2)
    losses, trainer = _steps_reference(tmp_path / "three", max_steps=3)
    three = {"losses": losses, "params": _trainable(trainer),
             "ema": trainer.teacher.state_dict()["ema"]}
    assert_resumed_as_uninterrupted([("2 -> 1", one, steps), ("1 -> 2", two, three)])


def assert_resumed_as_uninterrupted(runs: list[tuple[str, dict, dict]]) -> None:
    """Each resumed run's one step (its loss, then the weights and EMA) equals the
    uninterrupted run's last."""
    for what, result, expected in runs:
        _close(result["losses"], expected["losses"][-1:], f"{what}: loss after the checkpoint")
        _close_all(result["params"], expected["params"], f"{what}: parameter")
        _close_all(dict(enumerate(result["ema"])), dict(enumerate(expected["ema"])),
                   f"{what}: EMA")


def test_resuming_on_one_unsharded_process_is_refused(sharded, tmp_path) -> None:
    assert_resume_refused(sharded / "resume" / "run" / "checkpoints" / "checkpoint_1", tmp_path,
                          "fsdp2")


def assert_resume_refused(saved: Path, tmp_path: Path, sharding: str) -> None:
    """The 2-process checkpoint ``saved``, resumed by one process: refused before anything is
    loaded, naming the checkpoint and both process counts."""
    found = tmp_path / "run" / "checkpoints" / saved.name
    shutil.copytree(saved, found)
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8),
                          steps_config(tmp_path, 1, resume=True, save_steps=1),
                          rollout_engine=FixedResponses(len(tokenizer), tokenizer.eos_token_id))
    before = _trainable(trainer)
    with pytest.raises(ValueError, match=re.escape(
            f"checkpoint {found} was saved by 2 processes ({sharding}), this run has 1 "
            "(replicated)")):
        trainer.train()
    assert trainer.step == 0
    _close_all(_trainable(trainer), before, "untouched parameter")


def test_sampled_rollouts_and_greedy_evaluation(sharded, tmp_path) -> None:
    ranks = [_result(sharded, "sampling", r) for r in (0, 1)]
    assert ranks[0]["eval"] == ranks[1]["eval"] and ranks[0]["loss"] == ranks[1]["loss"]
    assert torch.isfinite(torch.tensor(ranks[0]["loss"]))
    model, tokenizer = small_model()
    config = small_config(tmp_path, max_steps=1, lora=True, lora_rank=4, teacher_mode="fixed",
                          problems_per_step=1, max_new_tokens=8)
    with torch.random.fork_rng():
        torch.manual_seed(1)  # LoRA's initial A, as in the worker
        trainer = OPSDTrainer(model, tokenizer, problems(8), config,
                              eval_dataset=problems(3, seed=1))
    assert ranks[0]["eval"] == trainer.evaluate()
