"""Run by test_trainer_deepspeed.py and test_trainer_zero3.py under ``accelerate launch
--config_file opsd_kernels/trainer/configs/<zero2 | zero3>.yaml --num_processes 2`` (gloo on CPU,
tests/deepspeed_on_cpu; under ZeRO-3 the tiny model's small weights are partitioned too): the
trainer under DeepSpeed, every case in one launch (or those named). Each case writes what every
rank saw to ``<out>/<case>-rank<r>.pt`` (whole weights, gathered under ZeRO-3); the tests compare
them with one process.

Cases: the loss and the whole gradients of one micro-batch (frozen / trainable head, tied /
untied embeddings, shared prefixes on / off; once with gradient checkpointing); two optimizer
steps with the EMA teacher, two accumulated micro-batches and a clipping gradient norm; the same
run stopped after one step and resumed; three steps, the second on a NaN loss; greedy
evaluation (one process with fewer problems, one with none) and a step on sampled rollouts; a
checkpoint of another number of processes resumed (``reshard``, launched apart with the
checkpoint in place). The steps case also reports whether the engine runs bf16.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import deepspeed_on_cpu  # noqa: E402
from fsdp_train_worker import (  # noqa: E402
    GLOBAL_PROBLEMS,
    fixed_batch,
    gradient_config,
    reshard_step,
    steps_config,
)
from trainer_fixtures import FixedResponses, problems, small_config, small_model  # noqa: E402

from opsd_kernels.trainer import OPSDTrainer, zero  # noqa: E402

# name -> (lora, tied embeddings, shared prefixes, gradient checkpointing)
GRADIENT_CASES = {"full-tied-prefix": (False, True, True, False),
                  "full-untied-plain": (False, False, False, False),
                  "lora-untied-prefix": (True, False, True, False),
                  "full-untied-prefix-checkpointed": (False, False, True, True)}
CLIP = 0.2  # below the steps' gradient norms: DeepSpeed's clipping is exercised


def on_deepspeed(config):
    """``device: auto``: accelerate turns DeepSpeed off when asked for the CPU."""
    config.device = "auto"
    return config


def whole(param: torch.nn.Parameter) -> torch.Tensor:
    """A copy of the whole parameter (gathered from its ZeRO-3 partitions: a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None,
                                           enabled=hasattr(param, "ds_id")):
        return param.detach().clone()


def trainable(trainer: OPSDTrainer) -> dict[str, torch.Tensor]:
    return {n: whole(p) for n, p in trainer.model.named_parameters() if p.requires_grad}


def run_gradients(out: Path, name: str, rank: int, world: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    lora, tied, *options = GRADIENT_CASES[name]
    model, tokenizer = small_model(tie_word_embeddings=tied)
    torch.manual_seed(1)  # LoRA's initial A, drawn from the global generator
    trainer = OPSDTrainer(model, tokenizer, problems(8),
                          on_deepspeed(gradient_config(out / name, lora, *options)))
    per_rank = GLOBAL_PROBLEMS // world
    everything = fixed_batch(trainer, 0, GLOBAL_PROBLEMS)
    batch = fixed_batch(trainer, rank * per_rank, per_rank)
    loss, _ = trainer.objective(batch, torch.tensor(float(everything.num_tokens)))
    zero.backward(trainer.accelerator, loss, last=True)  # as train_step: reduced at the boundary
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: safe_get_full_grad(p).clone() for n, p in trainer.model.named_parameters()
             if p.requires_grad}
    head = trainer.model.get_output_embeddings().weight
    return {"loss": total, "grads": grads, "engine": type(trainer.objective).__name__,
            "stage": trainer.objective.zero_optimization_stage(),
            # ZeRO-3 keeps a partition of the head on each process
            "head_partitioned": hasattr(head, "ds_id") and head.ds_tensor.numel() < head.ds_numel}


def run_steps(out: Path, rank: int, world: int) -> dict:
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8),
                          steps_config(out / "steps", world, max_grad_norm=CLIP, device="auto"),
                          rollout_engine=FixedResponses(len(tokenizer), tokenizer.eos_token_id))
    history = trainer.train()
    return {"losses": [h["loss"] for h in history], "norms": [h["grad_norm"] for h in history],
            "params": trainable(trainer), "ema": trainer.teacher.state_dict()["ema"],
            "bf16": trainer.objective.bfloat16_enabled(),  # the engine's weights are bf16
            "param_dtype": next(trainer.objective.module.parameters()).dtype}


def poison_step(trainer: OPSDTrainer, module, step: int) -> None:
    """The objective's loss becomes NaN on (1-based) step ``step``."""
    forward = module.forward

    def poisoned(batch, num_items, *targets):
        loss, sums = forward(batch, num_items, *targets)
        return (loss * float("nan") if trainer.step + 1 == step else loss), sums

    module.forward = poisoned


def run_nonfinite(out: Path, rank: int, world: int) -> dict:
    """Three steps, the second on a NaN loss: DeepSpeed skips its update."""
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8),
                          steps_config(out / "nonfinite", world, max_steps=3, device="auto"),
                          rollout_engine=FixedResponses(len(tokenizer), tokenizer.eos_token_id))
    poison_step(trainer, trainer.objective.module, 2)  # inside the engine's forward
    history = trainer.train()
    return {"skipped": [h.get("skipped", 0) for h in history],
            "losses": [h["loss"] for h in history], "params": trainable(trainer),
            "ema": trainer.teacher.state_dict()["ema"]}


def run_resume(out: Path, rank: int, world: int) -> dict:
    results = []
    for max_steps, resume in ((1, False), (2, True)):
        model, tokenizer = small_model()
        config = steps_config(out / "resume", world, save_steps=1, resume=resume,
                              max_steps=max_steps, max_grad_norm=CLIP, device="auto")
        trainer = OPSDTrainer(model, tokenizer, problems(8), config, rollout_engine=(
            FixedResponses(len(tokenizer), tokenizer.eos_token_id)))
        results.append([h["loss"] for h in trainer.train()])
    return {"losses": results, "params": trainable(trainer),
            "ema": trainer.teacher.state_dict()["ema"]}


def run_reshard(out: Path, rank: int, world: int) -> dict:
    """Resume the checkpoint the test put in ``<out>/reshard`` (saved by another number of
    processes) and run one step, saving a checkpoint after it; what was refused, if it was."""
    model, tokenizer = small_model()
    config = steps_config(out / "reshard", world, resume=True, save_steps=1,
                          max_steps=reshard_step(out) + 1, max_grad_norm=CLIP, device="auto")
    trainer = OPSDTrainer(model, tokenizer, problems(8), config, rollout_engine=(
        FixedResponses(len(tokenizer), tokenizer.eos_token_id)))
    try:
        history = trainer.train()
    except ValueError as refused:
        return {"refused": str(refused), "engine": type(trainer.objective).__name__}
    return {"losses": [h["loss"] for h in history], "params": trainable(trainer),
            "ema": trainer.teacher.state_dict()["ema"], "refused": None}


def run_sampling(out: Path, rank: int, world: int) -> dict:
    """Greedy evaluation (3 problems: one process has fewer; 1 problem: one has none), then a
    step on sampled rollouts."""
    model, tokenizer = small_model()
    config = small_config(out / "sampling", max_steps=1, lora=True, lora_rank=4,
                          teacher_mode="fixed", problems_per_step=1, max_new_tokens=8,
                          device="auto")
    torch.manual_seed(1)
    trainer = OPSDTrainer(model, tokenizer, problems(8), config, eval_dataset=problems(3, seed=1))
    evaluation = trainer.evaluate()
    alone = trainer.evaluate(trainer.eval_problems[:1])
    history = trainer.train()
    return {"eval": evaluation, "eval_alone": alone, "loss": history[0]["loss"]}


def main(out_dir: str) -> None:
    deepspeed_on_cpu.enable()
    deepspeed_on_cpu.partition_small_weights()
    out = Path(out_dir)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {**{name: (lambda name=name: run_gradients(out, name, rank, world))
                for name in GRADIENT_CASES},
             "steps": lambda: run_steps(out, rank, world),
             "resume": lambda: run_resume(out, rank, world),
             "sampling": lambda: run_sampling(out, rank, world),
             "nonfinite": lambda: run_nonfinite(out, rank, world),
             "reshard": lambda: run_reshard(out, rank, world)}
    # reshard reads a checkpoint the test puts in place: only when named
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else [c for c in cases if c != "reshard"]
    for name in chosen:
        result = cases[name]()
        torch.save({"world": world, **result}, out / f"{name}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
