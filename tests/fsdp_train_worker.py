"""Run by test_trainer_fsdp.py under ``accelerate launch --config_file
opsd_kernels/trainer/configs/fsdp2.yaml --num_processes 2`` (gloo on CPU): the trainer under
FSDP2, every case in one launch. Each case writes what rank 0 (and, where the ranks are compared,
every rank) saw to ``<out>/<case>-rank<r>.pt``; the test compares them with one process.

Cases: the loss and the whole gradients of one micro-batch (frozen / trainable head, tied /
untied embeddings, shared prefixes on / off; once with gradient checkpointing); two optimizer
steps with the EMA teacher and gradient accumulation; the same run stopped after one step and
resumed; a checkpoint of another number of processes resumed (``reshard``, launched apart with
the checkpoint in place); greedy evaluation and a step on sampled rollouts. The steps case also
reports the MixedPrecisionPolicy that fully_shard got (launched with bf16 too).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import fsdp_on_cpu  # noqa: E402
from trainer_fixtures import FixedResponses, problems, small_config, small_model  # noqa: E402

from opsd_kernels import sharding  # noqa: E402
from opsd_kernels.trainer import OPSDTrainer  # noqa: E402
from opsd_kernels.trainer.objective import RolloutBatch  # noqa: E402

ROLLOUTS = 2
GLOBAL_PROBLEMS = 4  # of one micro-batch, split over the processes

# name -> (lora, tied embeddings, shared prefixes, gradient checkpointing)
GRADIENT_CASES = {
    f"{head}-{tie}-{prefix}": (head == "lora", tie == "tied", prefix == "prefix", False)
    for head in ("full", "lora") for tie in ("tied", "untied") for prefix in ("prefix", "plain")}
GRADIENT_CASES["full-untied-prefix-checkpointed"] = (False, False, True, True)


def gradient_config(out: Path, lora: bool, shared_prefix: bool, checkpointed: bool):
    # The frozen head comes with LoRA and the initial-policy teacher; the trainable one with the
    # current-weights teacher, which reads the student's prompt head (three passes per layer).
    teacher = {"lora": True, "lora_rank": 4, "teacher_mode": "fixed"} if lora else {
        "teacher_mode": "current"}
    return small_config(out, num_rollouts=ROLLOUTS, shared_prefix=shared_prefix,
                        gradient_checkpointing=checkpointed, **teacher)


def fixed_batch(trainer: OPSDTrainer, start: int, count: int) -> RolloutBatch:
    """Problems [start, start + count) of the trainer's data with `FixedResponses` rollouts."""
    chosen = trainer.train_problems[start:start + count]
    engine = FixedResponses(len(trainer.tokenizer), trainer.tokenizer.eos_token_id)
    from opsd_kernels.trainer.rollouts import SamplingParams

    responses = engine.generate([p.student for p in chosen], SamplingParams(ROLLOUTS))
    return RolloutBatch(chosen, responses, [g for g in range(count) for _ in range(ROLLOUTS)])


def steps_config(out: Path, world: int, **overrides):
    """The EMA teacher, two micro-batches per step: GLOBAL_PROBLEMS problems a step in all."""
    values = {"num_rollouts": ROLLOUTS, "teacher_mode": "ema", "ema_decay": 0.5,
              "gradient_accumulation_steps": 2, "max_steps": 2,
              "problems_per_step": GLOBAL_PROBLEMS // (2 * world)}
    return small_config(out, **{**values, **overrides})


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def trainable(trainer: OPSDTrainer) -> dict[str, torch.Tensor]:
    return {n: whole(p.detach()) for n, p in trainer.model.named_parameters() if p.requires_grad}


def run_gradients(out: Path, name: str, rank: int, world: int) -> dict:
    lora, tied, *options = GRADIENT_CASES[name]
    model, tokenizer = small_model(tie_word_embeddings=tied)
    torch.manual_seed(1)  # LoRA's initial A, drawn from the global generator
    trainer = OPSDTrainer(model, tokenizer, problems(8), gradient_config(out / name, lora,
                                                                           *options))
    per_rank = GLOBAL_PROBLEMS // world
    everything = fixed_batch(trainer, 0, GLOBAL_PROBLEMS)
    batch = fixed_batch(trainer, rank * per_rank, per_rank)
    num_items = torch.tensor(float(everything.num_tokens))
    loss, _ = trainer.objective(batch, num_items)
    trainer.accelerator.backward(loss * world)  # as train_step: num_items is global already
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: whole(p.grad) for n, p in trainer.model.named_parameters() if p.requires_grad}
    units = sorted({type(m).__name__ for m in trainer.objective.modules()
                    if type(m).__name__.startswith("FSDP")})
    return {"loss": total, "grads": grads, "units": units,
            "head_sharded": type(trainer.model.get_output_embeddings().weight).__name__}


def run_steps(out: Path, rank: int, world: int) -> dict:
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8), steps_config(out / "steps", world),
                          rollout_engine=FixedResponses(len(tokenizer), tokenizer.eos_token_id))
    history = trainer.train()
    policy = trainer.objective._get_fsdp_state()._mp_policy  # what fully_shard was given
    return {"losses": [h["loss"] for h in history], "params": trainable(trainer),
            "ema": trainer.teacher.state_dict()["ema"], "param_dtype": policy.param_dtype,
            "reduce_dtype": policy.reduce_dtype}


def run_resume(out: Path, rank: int, world: int) -> dict:
    results = []
    for max_steps, resume in ((1, False), (2, True)):
        model, tokenizer = small_model()
        config = steps_config(out / "resume", world, save_steps=1, resume=resume,
                              max_steps=max_steps)
        trainer = OPSDTrainer(model, tokenizer, problems(8), config, rollout_engine=(
            FixedResponses(len(tokenizer), tokenizer.eos_token_id)))
        results.append([h["loss"] for h in trainer.train()])
    return {"losses": results, "params": trainable(trainer),
            "ema": trainer.teacher.state_dict()["ema"]}


def reshard_step(out: Path) -> int:
    """The step of the checkpoint put in ``<out>/reshard``."""
    found = [p.name for p in (out / "reshard" / "run" / "checkpoints").glob("checkpoint_*")]
    return max(int(name.removeprefix("checkpoint_")) for name in found)


def run_reshard(out: Path, rank: int, world: int) -> dict:
    """Resume the checkpoint the test put in ``<out>/reshard`` (saved by another number of
    processes) and run one step, saving a checkpoint after it."""
    model, tokenizer = small_model()
    config = steps_config(out / "reshard", world, resume=True, save_steps=1,
                          max_steps=reshard_step(out) + 1)
    trainer = OPSDTrainer(model, tokenizer, problems(8), config, rollout_engine=(
        FixedResponses(len(tokenizer), tokenizer.eos_token_id)))
    history = trainer.train()
    return {"losses": [h["loss"] for h in history], "params": trainable(trainer),
            "ema": trainer.teacher.state_dict()["ema"], "sharded": sharding.is_fsdp_unit(
                trainer.objective)}


def run_sampling(out: Path, rank: int, world: int) -> dict:
    """Greedy evaluation (3 problems: one process has fewer), then a step on rollouts sampled by
    transformers' generate inside the root's forward."""
    model, tokenizer = small_model()
    config = small_config(out / "sampling", max_steps=1, lora=True, lora_rank=4,
                          teacher_mode="fixed", problems_per_step=1, max_new_tokens=8)
    torch.manual_seed(1)
    trainer = OPSDTrainer(model, tokenizer, problems(8), config, eval_dataset=problems(3, seed=1))
    evaluation = trainer.evaluate()
    history = trainer.train()
    return {"eval": evaluation, "loss": history[0]["loss"]}


def main(out_dir: str) -> None:
    fsdp_on_cpu.enable()
    out = Path(out_dir)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {**{name: (lambda name=name: run_gradients(out, name, rank, world))
                for name in GRADIENT_CASES},
             "steps": lambda: run_steps(out, rank, world),
             "resume": lambda: run_resume(out, rank, world),
             "sampling": lambda: run_sampling(out, rank, world),
             "reshard": lambda: run_reshard(out, rank, world)}
    # reshard reads a checkpoint the test puts in place: only when named
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else [c for c in cases if c != "reshard"]
    for name in chosen:
        result = cases[name]()
        torch.save({"world": world, **result}, out / f"{name}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
