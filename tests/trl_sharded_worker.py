"""Run by test_integrations_trl_sharded.py under ``accelerate launch --config_file
opsd_kernels/trainer/configs/<fsdp2 | zero2 | zero3>.yaml --num_processes 2`` (gloo on CPU): the
fused TRL trainers' compute_loss on sharded models, each process on its own part of a batch.
Each case writes its loss and the whole (gathered) gradients to ``<out>/<case>-rank<r>.pt``.

Cases: GKD (a separate teacher, untied heads, full fine-tuning); SDFT with its frozen base model
as the teacher (tied embeddings), with and without importance clipping (whose per-token loss
reads the heads again in backward); SDFT on a LoRA student whose teacher is the same model with
the adapter off (a frozen head).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import deepspeed_on_cpu  # noqa: E402
import fsdp_on_cpu  # noqa: E402
from trl_fixtures import (  # noqa: E402
    gkd_config,
    gkd_dataset,
    perturb,
    sdft_batch,
    sdft_config,
    sdft_dataset,
    tiny_model,
    tiny_tokenizer,
)

from opsd_kernels.integrations.trl import FusedGKDTrainer, FusedSDFTTrainer  # noqa: E402

CASES = ("gkd", "sdft", "sdft-clipped", "sdft-lora")
# Completion lengths of each process's SDFT rows: the same longest, so the parts concatenate.
SDFT_LENGTHS = ([5, 0, 3], [2, 5, 4])


def gkd_trainer(out: Path, **args):
    return FusedGKDTrainer(model=tiny_model(0), teacher_model=tiny_model(1),
                           args=gkd_config(out, **args), train_dataset=gkd_dataset(),
                           processing_class=tiny_tokenizer())


def gkd_batches(trainer) -> list[dict[str, torch.Tensor]]:
    """The collated rows, cut in two parts (one per process)."""
    batch = trainer.data_collator([dict(row) for row in trainer.train_dataset])
    return [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]


def sdft_trainer(out: Path, case: str, **args):
    if case == "sdft-lora":
        import peft

        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False, task_type="CAUSAL_LM")
        torch.manual_seed(9)  # the adapter's initial weights
        return FusedSDFTTrainer(model=tiny_model(9), args=sdft_config(out / "args", **args),
                                train_dataset=sdft_dataset(), processing_class=tiny_tokenizer(),
                                peft_config=lora)
    path = out / "tiny-qwen3"
    if not path.exists() and (not dist.is_initialized() or dist.get_rank() == 0):
        tiny_model(4, tie_word_embeddings=True).save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()
    trainer = FusedSDFTTrainer(model=str(path), args=sdft_config(out / "args", **args),
                               train_dataset=sdft_dataset(), processing_class=tiny_tokenizer())
    # Every process moves it the same way; under ZeRO-3 transformers loaded it partitioned
    # already (zero.Init), so it is moved gathered, rank 0's values kept.
    params = [p for p in trainer.model.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            perturb(trainer.model, 5)
    else:
        perturb(trainer.model, 5)
    return trainer


def sdft_batches(trainer, case: str) -> list[dict[str, torch.Tensor]]:
    batches = [sdft_batch(trainer, lengths, seed=6 + k)
               for k, lengths in enumerate(SDFT_LENGTHS)]
    if case == "sdft-clipped":
        trainer.args.distillation_is_clip = 1.5
        gen = torch.Generator().manual_seed(7)
        for batch in batches:  # rollout log-probs, away from the student's own
            width = batch["completion_ids"].size(1)
            batch["old_per_token_logps"] = -2.0 + 0.7 * torch.randn((3, width), generator=gen)
    return batches


def prepared(trainer) -> torch.nn.Module:
    """The student sharded as transformers' Trainer does when it trains (model and optimizer
    through accelerate's prepare): FSDP2 shards it in place, DeepSpeed returns its engine."""
    optimizer = torch.optim.SGD([p for p in trainer.model.parameters() if p.requires_grad],
                                lr=0.0)
    wrapped, _ = trainer.accelerator.prepare(trainer.model, optimizer)
    trainer.model_wrapped = wrapped
    return wrapped


def backward(wrapped: torch.nn.Module, loss: torch.Tensor) -> None:
    if hasattr(wrapped, "backward"):  # a DeepSpeed engine: it reduces into its partitions
        wrapped.backward(loss)
    else:
        loss.backward()


def whole_grad(wrapped: torch.nn.Module, param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(wrapped, "backward"):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)  # gathers the partitions (a collective)
    grad = param.grad
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad.detach().clone()


def run(out: Path, case: str, rank: int, world: int) -> dict:
    # accelerate runs DeepSpeed only off the CPU setting, FSDP on the CPU only with it
    args = {"use_cpu": os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true"}
    if case == "gkd":
        trainer = gkd_trainer(out / case, **args)
        parts = gkd_batches(trainer)
        # TRL's num_items_in_batch: the tokens of the whole batch, over every process; each
        # process's loss is its share of the sum, which FSDP's average would divide
        kwargs = {"num_items_in_batch": sum(int((p["labels"][:, 1:] != -100).sum())
                                            for p in parts)}
        scale = world
    else:
        trainer = sdft_trainer(out / case, case, **args)
        parts = sdft_batches(trainer, case)
        trainer.current_gradient_accumulation_steps = 1
        kwargs, scale = {}, 1  # a mean over equal parts: FSDP's average is the whole mean
    wrapped = prepared(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(wrapped, parts[rank], **kwargs)
    backward(wrapped, loss * scale)
    total = loss.detach() * scale / world  # the whole batch's loss, summed over processes
    dist.all_reduce(total)
    grads = {n: whole_grad(wrapped, p) for n, p in trainer.model.named_parameters()
             if p.requires_grad}
    head = trainer.model.get_output_embeddings().weight
    return {"loss": total, "grads": grads, "wrapper": type(wrapped).__name__,
            "units": sorted({type(m).__name__ for m in trainer.model.modules()
                             if type(m).__name__.startswith("FSDP")}),
            # ZeRO-3 keeps the head's partition only (small weights, such as norms, stay whole)
            "head_partitioned": hasattr(head, "ds_id") and head.numel() == 0}


def main(out_dir: str) -> None:
    fsdp_on_cpu.enable()
    deepspeed_on_cpu.enable()
    deepspeed_on_cpu.partition_small_weights()
    out = Path(out_dir)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in (sys.argv[2].split(",") if len(sys.argv) > 2 else CASES):
        result = run(out, case, rank, world)
        torch.save({"world": world, **result}, out / f"{case}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
