"""Two processes under torchrun (gloo on CPU) train in step: DDP through accelerate keeps the
parameters identical while each rank samples rollouts for different problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_train_worker.py"
pytestmark = pytest.mark.slow  # two torchrun processes


@pytest.mark.parametrize("lora", ["0", "1"], ids=["full", "lora"])
def test_two_process_ddp_keeps_parameters_identical(tmp_path, lora) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29500 + os.getpid() % 1000), str(WORKER), str(tmp_path), lora],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["wrapper"] == "DistributedDataParallel"
    # Each rank read different problems, yet both log the same (globally reduced) loss ...
    for step in range(2):
        assert ranks[0]["problems"][step] != ranks[1]["problems"][step]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # ... and after two optimizer steps the weights are the same on both.
    p0, p1 = (torch.load(tmp_path / f"params-{r}.pt") for r in (0, 1))
    assert torch.equal(p0, p1)
    initial = _initial_trainable(lora == "1")
    assert not torch.equal(p0, initial)  # they moved


def _initial_trainable(lora: bool) -> torch.Tensor:
    sys.path.insert(0, str(WORKER.parent))
    from trainer_fixtures import small_model

    from opsd_kernels.trainer.config import OPSDConfig
    from opsd_kernels.trainer.models import prepare_model

    model, _ = small_model()
    if lora:
        model = prepare_model(model, OPSDConfig(lora=True, lora_rank=4, teacher_mode="fixed"))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
