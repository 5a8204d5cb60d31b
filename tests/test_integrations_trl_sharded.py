"""The fused TRL trainers on sharded models: two processes (gloo on CPU) started by
`accelerate launch` with each shipped config (FSDP2, DeepSpeed ZeRO-2, ZeRO-3) compute the loss
of their part of a batch (tests/trl_sharded_worker.py, every case in one launch per config); the
whole batch's loss and every whole gradient equal what the same trainer computes on the whole
batch in one process (fp32, relative 1e-5)."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl.experimental.sdft")
pytest.importorskip("peft")

from trl_sharded_worker import (  # noqa: E402
    CASES,
    gkd_batches,
    gkd_trainer,
    sdft_batches,
    sdft_trainer,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "trl_sharded_worker.py"
CONFIGS = ROOT / "opsd_kernels" / "trainer" / "configs"
RTOL = 1e-5
_NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                   reason="deepspeed is not installed")
pytestmark = pytest.mark.slow  # two processes under accelerate launch


@pytest.fixture(scope="module", params=["fsdp2", pytest.param("zero2", marks=_NO_DEEPSPEED),
                                        pytest.param("zero3", marks=_NO_DEEPSPEED)])
def sharded(request, tmp_path_factory) -> tuple[str, Path]:
    config = request.param
    out = tmp_path_factory.mktemp(f"trl-{config}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = 28300 + os.getpid() % 500 + 10 * ("fsdp2", "zero2", "zero3").index(config)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch",
         "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", "2",
         "--mixed_precision", "no", "--main_process_port", str(port), str(WORKER), str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return config, out


@functools.cache
def _one_process(case: str, tmp: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the whole batch and every gradient, in this process."""
    if case == "gkd":
        trainer = gkd_trainer(Path(tmp))
        parts = gkd_batches(trainer)
        kwargs = {"num_items_in_batch": sum(int((p["labels"][:, 1:] != -100).sum())
                                            for p in parts)}
    else:
        trainer = sdft_trainer(Path(tmp), case)
        parts = sdft_batches(trainer, case)
        trainer.current_gradient_accumulation_steps = 1
        kwargs = {}
    assert all(parts[0][k].shape[1:] == p[k].shape[1:] for p in parts for k in parts[0])
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, whole, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()
                           if p.requires_grad}


def _close(actual, expected, what: str) -> None:
    scale = max(expected.detach().abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=RTOL,
                               atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_one_process(sharded, tmp_path_factory, case) -> None:
    config, out = sharded
    result = torch.load(out / f"{case}-rank0.pt", weights_only=False)
    assert result["world"] == 2
    if config == "fsdp2":  # sharded for real: the layers and the head are FSDP2 units
        assert {"FSDPQwen3DecoderLayer", "FSDPLinear"} <= set(result["units"]), result["units"]
    else:
        assert result["wrapper"] == "DeepSpeedEngine"
        assert result["head_partitioned"] == (config == "zero3")
    loss, grads = _one_process(case, str(tmp_path_factory.mktemp(f"one-{case}")))
    _close(result["loss"], loss, "loss")
    assert result["grads"].keys() == grads.keys() and grads
    for name, grad in grads.items():
        _close(result["grads"][name], grad, f"gradient of {name}")
    assert any(g.abs().max() > 0 for g in grads.values())
