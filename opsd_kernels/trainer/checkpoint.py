"""Checkpoints: the model (or its LoRA adapter) in Hugging Face format beside the optimizer,
scheduler, EMA teacher and step, so a resumed run continues exactly where the interrupted one
stopped (the sampling RNG is reseeded from (seed, step, rank) every step, so it needs no saving).
``trainer_state.json`` is written last: a directory without it is an interrupted save and is
never resumed from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_model(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """Hugging Face format: the full model, or the adapter of a peft model."""
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load what `save_model` wrote back into ``model`` (same architecture / adapter)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint: no .safetensors weights in {directory}")
    saved: dict[str, torch.Tensor] = {}
    for f in files:
        saved.update(load_file(str(f)))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, saved)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    else:
        result = model.load_state_dict(saved, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise RuntimeError(f"checkpoint: {directory} lacks weights for {missing[:5]}")


def save_checkpoint(directory: Path, *, model: nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, teacher_state: dict,
                    step: int, keep: int | None = None) -> Path:
    path = directory / f"checkpoint-{step}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    save_model(model, tokenizer, path)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "teacher": teacher_state}, path / TENSORS_FILE)
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[int, dict]:
    """Restore a checkpoint in place; returns (step, teacher state)."""
    step = json.loads((path / STATE_FILE).read_text())["step"]
    load_model_weights(model, path)
    state = torch.load(path / TENSORS_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return step, state["teacher"]
