"""Run under `torchrun --nproc_per_node 2` (gloo, CPU) by test_trainer_ddp.py: a few OPSD
steps, then every rank's parameters and rollout losses are written for the test to compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from trainer_fixtures import problems, small_config, small_model  # noqa: E402

from opsd_kernels.trainer import OPSDTrainer  # noqa: E402


def main(out_dir: str, lora: str) -> None:
    overrides = {"lora": True, "lora_rank": 4, "teacher_mode": "fixed"} if lora == "1" else {}
    config = small_config(Path(out_dir), max_steps=2, **overrides)
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(8), config)
    local = []
    real_step = trainer.train_step

    def step_and_record():  # the rollouts each rank sampled, to show the ranks saw different data
        local.append([p.student for p in trainer._problems_for(trainer.step, 0)])
        return real_step()

    trainer.train_step = step_and_record
    history = trainer.train()
    rank = dist.get_rank()
    params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()
                        if p.requires_grad])
    torch.save(params, Path(out_dir) / f"params-{rank}.pt")
    (Path(out_dir) / f"rank-{rank}.json").write_text(json.dumps({
        "world": dist.get_world_size(), "problems": local,
        "wrapper": type(trainer.objective).__name__,
        "losses": [h["loss"] for h in history]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
