"""The fused TRL trainers under FSDP2: two processes (gloo on CPU) started by `accelerate launch`
with the shipped configs/fsdp2.yaml compute the loss of their part of a batch
(tests/trl_fsdp_worker.py); the whole batch's loss and every whole gradient equal what the same
trainer computes on the whole batch in one process (fp32, relative 1e-5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl.experimental.sdft")
pytest.importorskip("peft")

from trl_fsdp_worker import CASES, gkd_batches, gkd_trainer, sdft_batches, sdft_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "trl_fsdp_worker.py"
CONFIG = ROOT / "opsd_kernels" / "trainer" / "configs" / "fsdp2.yaml"
RTOL = 1e-5
pytestmark = pytest.mark.slow  # two processes under accelerate launch


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trl-fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
         "--num_processes", "2", "--mixed_precision", "no",
         "--main_process_port", str(28300 + os.getpid() % 1000), str(WORKER), str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out


def _close(actual, expected, what: str) -> None:
    scale = max(expected.detach().abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=RTOL,
                               atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def _whole_batch(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    assert all(parts[0][k].shape[1:] == p[k].shape[1:] for p in parts for k in parts[0])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_one_process(sharded, tmp_path, case) -> None:
    result = torch.load(sharded / f"{case}-rank0.pt", weights_only=False)
    assert result["world"] == 2
    assert {"FSDPQwen3DecoderLayer", "FSDPLinear"} <= set(result["units"]), result["units"]
    if case == "gkd":
        trainer = gkd_trainer(tmp_path)
        parts = gkd_batches(trainer)
        kwargs = {"num_items_in_batch": sum(int((p["labels"][:, 1:] != -100).sum())
                                            for p in parts)}
    else:
        trainer = sdft_trainer(tmp_path, case)
        parts = sdft_batches(trainer, case)
        trainer.current_gradient_accumulation_steps = 1
        kwargs = {}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _whole_batch(parts), **kwargs)
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    _close(result["loss"], loss, "loss")
    assert result["grads"].keys() == grads.keys() and grads
    for name, grad in grads.items():
        _close(result["grads"][name], grad, f"gradient of {name}")
    assert any(g.abs().max() > 0 for g in grads.values())
