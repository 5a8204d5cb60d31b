"""Run by test_integrations_trl_fsdp.py under ``accelerate launch --config_file
opsd_kernels/trainer/configs/fsdp2.yaml --num_processes 2`` (gloo on CPU): the fused TRL
trainers' compute_loss under FSDP2, each process on its own part of a batch. Each case writes
its loss and the whole (gathered) gradients to ``<out>/<case>-rank<r>.pt``.

Cases: GKD (a separate teacher, untied heads, full fine-tuning); SDFT with its frozen base model
as the teacher (tied embeddings), with and without importance clipping (whose per-token loss
reads the heads again in backward); SDFT on a LoRA student whose teacher is the same model with
the adapter off (a frozen head).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

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


def gkd_trainer(out: Path):
    return FusedGKDTrainer(model=tiny_model(0), teacher_model=tiny_model(1),
                           args=gkd_config(out), train_dataset=gkd_dataset(),
                           processing_class=tiny_tokenizer())


def gkd_batches(trainer) -> list[dict[str, torch.Tensor]]:
    """The collated rows, cut in two parts (one per process)."""
    batch = trainer.data_collator([dict(row) for row in trainer.train_dataset])
    return [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]


def sdft_trainer(out: Path, case: str):
    if case == "sdft-lora":
        import peft

        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False, task_type="CAUSAL_LM")
        torch.manual_seed(9)  # the adapter's initial weights
        return FusedSDFTTrainer(model=tiny_model(9), args=sdft_config(out / "args"),
                                train_dataset=sdft_dataset(), processing_class=tiny_tokenizer(),
                                peft_config=lora)
    path = out / "tiny-qwen3"
    if not path.exists() and (not dist.is_initialized() or dist.get_rank() == 0):
        tiny_model(4, tie_word_embeddings=True).save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()
    trainer = FusedSDFTTrainer(model=str(path), args=sdft_config(out / "args"),
                               train_dataset=sdft_dataset(), processing_class=tiny_tokenizer())
    perturb(trainer.model, 5)  # before sharding: every process moves it the same way
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


def prepared(trainer) -> None:
    """The student sharded as transformers' Trainer does when it trains (model and optimizer
    through accelerate's prepare)."""
    optimizer = torch.optim.SGD([p for p in trainer.model.parameters() if p.requires_grad],
                                lr=0.0)
    model, _ = trainer.accelerator.prepare(trainer.model, optimizer)
    assert model is trainer.model  # sharded in place: a teacher that is the student stays so
    trainer.model_wrapped = model


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def run(out: Path, case: str, rank: int, world: int) -> dict:
    if case == "gkd":
        trainer = gkd_trainer(out / case)
        parts = gkd_batches(trainer)
        # TRL's num_items_in_batch: the tokens of the whole batch, over every process; each
        # process's loss is its share of the sum, which FSDP's average would divide
        kwargs = {"num_items_in_batch": sum(int((p["labels"][:, 1:] != -100).sum())
                                            for p in parts)}
        scale = world
    else:
        trainer = sdft_trainer(out / case, case)
        parts = sdft_batches(trainer, case)
        trainer.current_gradient_accumulation_steps = 1
        kwargs, scale = {}, 1  # a mean over equal parts: FSDP's average is the whole mean
    prepared(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, parts[rank], **kwargs)
    (loss * scale).backward()
    total = loss.detach() * scale / world  # the whole batch's loss, summed over processes
    dist.all_reduce(total)
    grads = {n: whole(p.grad) for n, p in trainer.model.named_parameters() if p.requires_grad}
    units = sorted({type(m).__name__ for m in trainer.model.modules()
                    if type(m).__name__.startswith("FSDP")})
    return {"loss": total, "grads": grads, "units": units}


def main(out_dir: str) -> None:
    fsdp_on_cpu.enable()
    out = Path(out_dir)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in (sys.argv[2].split(",") if len(sys.argv) > 2 else CASES):
        result = run(out, case, rank, world)
        torch.save({"world": world, **result}, out / f"{case}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
