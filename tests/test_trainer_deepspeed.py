"""The trainer under DeepSpeed ZeRO-2 and ZeRO-3: two processes (gloo on CPU,
tests/deepspeed_on_cpu.py) started by `accelerate launch` with the shipped configs/zero2.yaml or
zero3.yaml run every case of tests/deepspeed_train_worker.py in one launch per config; this file
computes the same in one process and compares (fp32, relative 1e-5). Under ZeRO-3 every weight of
the tiny model is partitioned (the lm_head too), so each forward, rollout and evaluation runs on
both processes in lockstep.

- one micro-batch's loss and the whole gradient of every trainable parameter, for a frozen head
  (LoRA) and a trainable one, tied and untied embeddings, shared prefixes on and off, and once
  with gradient checkpointing;
- two optimizer steps with the EMA teacher, two accumulated micro-batches and a clipping
  max_grad_norm (DeepSpeed's accumulation, scaling and clipping): losses, gradient norms, every
  parameter (the same on both processes) and the EMA;
- the same run stopped after one step and resumed from its DeepSpeed checkpoint: the next loss,
  the final weights and the final/ model rank 0 wrote (gathered under ZeRO-3); the checkpoint
  resumed by 1 DeepSpeed process and (ZeRO-3) that process's next checkpoint by 2, through
  DeepSpeed's universal format (other launches: the same loss, weights and EMA as without
  interruption), and refused by one unsharded process;
- two steps under the bf16 section (another launch per config): their error from the fp32 run
  of the same order as one process's bf16 error (autocast there);
- three steps, the second on a NaN loss: DeepSpeed skips that update, the trainer reports it
  and skips the scheduler and teacher; the weights equal one process's, which skips it itself;
- greedy evaluation with one process holding fewer problems and with one holding none, and a
  step on sampled rollouts.

The ZeRO-3 settings the EMA teacher refuses are tested without a launch (test_trainer.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed_train_worker import CLIP, GRADIENT_CASES, poison_step
from fsdp_train_worker import GLOBAL_PROBLEMS, fixed_batch, gradient_config, steps_config
from test_trainer_fsdp import (
    _close,
    _close_all,
    _trainable,
    assert_bf16_matches_one_process,
    assert_resume_refused,
    assert_resumed_as_uninterrupted,
    assert_weights_match_one_process,
)
from trainer_fixtures import FixedResponses, problems, small_config, small_model

from opsd_kernels.trainer import OPSDTrainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "deepspeed_train_worker.py"
CONFIGS = ROOT / "opsd_kernels" / "trainer" / "configs"
pytestmark = [pytest.mark.slow,  # two processes under accelerate launch
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="deepspeed is not installed")]


def _launch(config: str, out: Path, *cases: str, precision: str = "no",
            processes: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = 29400 + os.getpid() % 500 + (10 if config == "zero3" else 0)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch",
         "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", str(processes),
         "--mixed_precision", precision, "--main_process_port", str(port), str(WORKER), str(out),
         *([",".join(cases)] if cases else [])],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def sharded(request, tmp_path_factory) -> Path:
    """Every case under the config with 2 processes; the folder of their results."""
    out = tmp_path_factory.mktemp(request.param)
    _launch(request.param, out)
    return out


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def sharded_bf16(request, tmp_path_factory) -> Path:
    """The steps case under the config's bf16 section (``--mixed_precision bf16``)."""
    out = tmp_path_factory.mktemp(f"{request.param}-bf16")
    _launch(request.param, out, "steps", precision="bf16")
    return out


@pytest.fixture
def stage(request, sharded) -> int:
    return int(request.node.callspec.params["sharded"].removeprefix("zero"))


def _result(out: Path, case: str, rank: int = 0) -> dict:
    result = torch.load(out / f"{case}-rank{rank}.pt", weights_only=False)
    assert result["world"] == 2
    return result


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_loss_and_gradients_match_one_process(sharded, stage, tmp_path, case) -> None:
    lora, tied, *options = GRADIENT_CASES[case]
    result = _result(sharded, case)
    assert result["engine"] == "DeepSpeedEngine" and result["stage"] == stage
    assert result["head_partitioned"] == (stage == 3)
    model, tokenizer = small_model(tie_word_embeddings=tied)
    with torch.random.fork_rng():
        torch.manual_seed(1)  # LoRA's initial A, as in the worker
        trainer = OPSDTrainer(model, tokenizer, problems(8),
                              gradient_config(tmp_path, lora, *options))
    batch = fixed_batch(trainer, 0, GLOBAL_PROBLEMS)
    loss, _ = trainer.objective(batch, torch.tensor(float(batch.num_tokens)))
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    _close(result["loss"], loss, "loss")
    _close_all(result["grads"], grads, "gradient of")
    head = trainer.model.get_output_embeddings().weight
    assert head.requires_grad != lora and any(g.abs().max() > 0 for g in grads.values())


def _steps_reference(tmp_path: Path, **overrides) -> tuple[list[dict], OPSDTrainer]:
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8),
                          steps_config(tmp_path, 1, max_grad_norm=CLIP, **overrides),
                          rollout_engine=FixedResponses(len(tokenizer), tokenizer.eos_token_id))
    return trainer.train(), trainer


def test_steps_with_the_ema_teacher_match_one_process(sharded, tmp_path) -> None:
    ranks = [_result(sharded, "steps", r) for r in (0, 1)]
    history, trainer = _steps_reference(tmp_path)
    result = ranks[0]
    _close(result["losses"], [h["loss"] for h in history], "losses")
    norms = [h["grad_norm"] for h in history]
    assert min(norms) > CLIP  # the clipping was exercised
    _close(result["norms"], norms, "gradient norms")
    assert_weights_match_one_process(ranks, trainer)


def test_bf16_steps_match_one_process_to_bf16_precision(sharded_bf16, tmp_path) -> None:
    ranks = [_result(sharded_bf16, "steps", r) for r in (0, 1)]
    # DeepSpeed's bf16: the engine computes on bf16 weights, its optimizer keeps fp32 masters
    assert ranks[0]["bf16"] and ranks[0]["param_dtype"] == torch.bfloat16

    def reference(path: Path) -> tuple[list[float], OPSDTrainer]:
        history, trainer = _steps_reference(path)
        return [h["loss"] for h in history], trainer

    assert_bf16_matches_one_process(ranks, reference, tmp_path)


def test_resume_repeats_the_next_step_and_rank_0_writes_the_model(sharded) -> None:
    from transformers import AutoModelForCausalLM

    steps, resumed = _result(sharded, "steps"), _result(sharded, "resume")
    first, second = resumed["losses"]
    assert len(first) == 1 and len(second) == 1  # the second run started at step 1
    _close(first + second, steps["losses"], "losses of the interrupted and resumed run")
    _close_all(resumed["params"], steps["params"], "resumed parameter")
    _close_all(dict(enumerate(resumed["ema"])), dict(enumerate(steps["ema"])), "resumed EMA")
    checkpoint = sharded / "resume" / "run" / "checkpoints" / "checkpoint_1"
    assert list(checkpoint.glob("pytorch_model/*optim_states.pt"))  # DeepSpeed's own state
    final = AutoModelForCausalLM.from_pretrained(sharded / "resume" / "run" / "final")
    _close_all({n: p for n, p in final.named_parameters()}, resumed["params"], "saved")


def _resharded(config: str, saved: Path, out: Path, processes: int) -> dict:
    """The steps run resumed from ``saved`` by ``processes`` DeepSpeed processes."""
    shutil.copytree(saved, out / "reshard" / "run" / "checkpoints" / saved.name)
    _launch(config, out, "reshard", processes=processes)
    result = torch.load(out / "reshard-rank0.pt", weights_only=False)
    assert result["world"] == processes and result["refused"] is None, result["refused"]
    assert not (out / "reshard" / "run" / "universal").exists()  # the converted copy is gone
    return result


def test_a_checkpoint_resumes_on_another_number_of_zero_processes(sharded, stage,
                                                                  tmp_path) -> None:
    """DeepSpeed's ``ds_to_universal`` converts the per-process partitions and the engine loads
    them as a universal checkpoint. The 2-process checkpoint of step 1, resumed by 1 process:
    step 2's loss, the weights (Adam's moments included) and the EMA equal the uninterrupted
    2-process run's; under ZeRO-3 (to keep the launches few) that process's checkpoint of step 2
    resumed by 2 too: step 3 equals the one-process run of three steps. (DeepSpeed alone stops:
    "Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
    currently supported".)"""
    config = f"zero{stage}"
    one = _resharded(config, sharded / "resume" / "run" / "checkpoints" / "checkpoint_1",
                     tmp_path / "to-1", 1)
    runs = [("2 -> 1", one, _result(sharded, "steps"))]
    if stage == 3:
        two = _resharded(config, tmp_path / "to-1" / "reshard" / "run" / "checkpoints" /
                         "checkpoint_2", tmp_path / "to-2", 2)
        history, trainer = _steps_reference(tmp_path / "three", max_steps=3)
        runs.append(("1 -> 2", two, {"losses": [h["loss"] for h in history],
                                     "params": _trainable(trainer),
                                     "ema": trainer.teacher.state_dict()["ema"]}))
    assert_resumed_as_uninterrupted(runs)


def test_resuming_on_one_unsharded_process_is_refused(sharded, stage, tmp_path) -> None:
    assert_resume_refused(sharded / "resume" / "run" / "checkpoints" / "checkpoint_1", tmp_path,
                          f"zero{stage}")


def test_a_non_finite_step_is_skipped_as_in_one_process(sharded, tmp_path) -> None:
    result = _result(sharded, "nonfinite")
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8), steps_config(tmp_path, 1, max_steps=3),
                          rollout_engine=FixedResponses(len(tokenizer), tokenizer.eos_token_id))
    poison_step(trainer, trainer.objective, 2)
    history = trainer.train()
    assert result["skipped"] == [h.get("skipped", 0) for h in history] == [0, 1, 0]
    losses = [h["loss"] for h in history]
    _close([result["losses"][i] for i in (0, 2)], [losses[i] for i in (0, 2)], "finite losses")
    assert all(torch.isfinite(p).all() for p in result["params"].values())
    _close_all(result["params"], _trainable(trainer), "parameter")
    _close_all(dict(enumerate(result["ema"])), dict(enumerate(trainer.teacher.state_dict()["ema"])),
               "EMA")


def test_sampled_rollouts_and_greedy_evaluation(sharded, tmp_path) -> None:
    ranks = [_result(sharded, "sampling", r) for r in (0, 1)]
    assert ranks[0]["eval"] == ranks[1]["eval"] and ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["eval_alone"] == ranks[1]["eval_alone"]
    assert torch.isfinite(torch.tensor(ranks[0]["loss"]))
    model, tokenizer = small_model()
    config = small_config(tmp_path, max_steps=1, lora=True, lora_rank=4, teacher_mode="fixed",
                          problems_per_step=1, max_new_tokens=8)
    with torch.random.fork_rng():
        torch.manual_seed(1)  # LoRA's initial A, as in the worker
        trainer = OPSDTrainer(model, tokenizer, problems(8), config,
                              eval_dataset=problems(3, seed=1))
    assert ranks[0]["eval"] == trainer.evaluate()
    assert ranks[0]["eval_alone"] == trainer.evaluate(trainer.eval_problems[:1])
