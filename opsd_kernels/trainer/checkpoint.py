"""Checkpoints through accelerate's ``save_state`` / ``load_state``, in
``output_dir/checkpoints/checkpoint_<step>`` (``save_total_limit`` keeps the newest): the
optimizer, scheduler and RNG as accelerate writes them, the step and the EMA teacher as
registered objects, and the model (or its LoRA adapter) in Hugging Face format by
``save_pretrained``, so ``opsd eval --checkpoint`` and ``from_pretrained`` read it and a LoRA run
does not write its frozen base each time. Sampling is reseeded from (seed, step, rank) every
step, so a resumed run repeats the interrupted one's next steps exactly.

Under FSDP accelerate saves and loads the sharded model and optimizer itself (the config's
``fsdp_state_dict_type``; SHARDED_STATE_DICT in the shipped configs: torch.distributed.checkpoint
files written by every process), and resuming reads those; the Hugging Face copy is written
besides, from the whole state dict gathered onto rank 0, for ``opsd eval`` and
``from_pretrained``. Under DeepSpeed the engine's own checkpoint (ZeRO-2: its fp32 weights and
partitioned optimizer state; ZeRO-3: each process's partitions of both; files per process) is
saved and read the same way; under ZeRO-2 every process holds the whole weights, so the Hugging
Face copy needs no gathering, under ZeRO-3 it is gathered onto rank 0 like FSDP2's.

Each checkpoint records the process count and sharding that wrote it (`layout`, with the step);
`check_layout` compares them with the resuming run's before anything is loaded: FSDP2 resumes on
any number of processes (torch.distributed.checkpoint reshards), DeepSpeed too (on another
number through its universal checkpoint format, `zero.as_universal`), a sharded checkpoint never
on an unsharded run, another ZeRO stage, or the reverse."""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opsd_kernels import sharding
from opsd_kernels.trainer import zero

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^checkpoint_(\d+)$")


def save_model(model: nn.Module, tokenizer: Any, directory: Path, write: bool = True) -> None:
    """Hugging Face format: the full model, or the adapter of a peft model. A model sharded by
    FSDP2 or ZeRO-3 is gathered first, which every process must join; only those with ``write``
    write."""
    whole = sharding.full_state_dict(model)  # None: model.state_dict() is whole already
    if not write:
        return
    with _no_progress_bars():  # a "Writing model shards" bar per save, amid the step lines
        model.save_pretrained(directory, **({} if whole is None else {"state_dict": whole}))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


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


class Progress:
    """The trainer's step, saved with each checkpoint as an accelerate custom object (the first
    one, ``custom_checkpoint_0.pkl``), with the run's `layout`, which `check_layout` compares
    before a resume."""

    def __init__(self, layout: dict[str, Any] | None = None) -> None:
        self.step = 0
        self.layout = layout or {"num_processes": 1, "sharding": REPLICATED}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, **self.layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


REPLICATED = "replicated"  # one process, or DDP: every process holds the whole state
PROGRESS_FILE = "custom_checkpoint_0.pkl"


def layout(accelerator: Any) -> dict[str, Any]:
    """How a run splits its model and optimizer state: the number of processes and the
    sharding, "fsdp2", "zero<stage>" (DeepSpeed) or `REPLICATED`."""
    if accelerator.distributed_type == "FSDP":
        sharding_name = f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    elif zero.is_deepspeed(accelerator):
        sharding_name = f"zero{zero.zero_config(accelerator).get('stage', 0)}"
    else:
        sharding_name = REPLICATED
    return {"num_processes": accelerator.num_processes, "sharding": sharding_name}


def saved_layout(path: Path) -> dict[str, Any]:
    """The `layout` a checkpoint was saved with. Checkpoints written before it was recorded:
    the process count from accelerate's per-process RNG files, the sharding from the model's
    folder (DeepSpeed's without its stage)."""
    saved = torch.load(path / PROGRESS_FILE, weights_only=True)
    if "num_processes" in saved:
        return {"num_processes": saved["num_processes"], "sharding": saved["sharding"]}
    sharding_name = ("fsdp2" if (path / "pytorch_model_fsdp_0").is_dir() else
                     "zero" if (path / "pytorch_model").is_dir() else REPLICATED)
    return {"num_processes": len(list(path.glob("random_states_*.pkl"))) or 1,
            "sharding": sharding_name}


def check_layout(path: Path, current: dict[str, Any]) -> bool:
    """Refuse to resume a checkpoint whose state is split otherwise than this run can read;
    whether it must be read as a DeepSpeed universal checkpoint.

    - FSDP2 on any number of processes: accelerate reads its torch.distributed.checkpoint files
      into this run's shards, which reshards the model and optimizer state (tested from 2
      processes to 1 and from 1 to 2); the EMA and the step are saved whole.
    - DeepSpeed ZeRO under the stage that saved it: on its own process count as it is, on
      another after DeepSpeed's ``ds_to_universal`` has converted its per-process partitions
      (`zero.as_universal`; returns True). A checkpoint written before the layout was
      recorded does not say its stage: on its own count only.
    - Replicated (one process, DDP: the whole state in one place): on any number.
    - Across those kinds (a sharded checkpoint on one plain process, or the reverse, or another
      ZeRO stage): refused, accelerate reads each kind's files only under that kind (the model
      of every checkpoint is also saved in Hugging Face format, to start a new run from).
    """
    saved = saved_layout(path)
    kind, count = saved["sharding"], saved["num_processes"]
    if kind == current["sharding"] in (REPLICATED, "fsdp2"):
        return False
    if kind == "zero" and current["sharding"].startswith("zero"):
        kind = current["sharding"] if count == current["num_processes"] else kind
    if kind != current["sharding"]:
        raise ValueError(
            f"resume: checkpoint {path} was saved by {count} processes ({kind}), this run has "
            f"{current['num_processes']} ({current['sharding']}); it resumes only under the "
            f"sharding that saved it (or start a new run from the model saved in it)")
    return count != current["num_processes"]


def project_configuration(output_dir: Path, total_limit: int | None) -> Any:
    from accelerate.utils import ProjectConfiguration

    return ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir),
                                automatic_checkpoint_naming=True, total_limit=total_limit)


def use_hugging_face_format(accelerator: Any, model: Callable[[], nn.Module],
                            tokenizer: Any) -> None:
    """Make save_state / load_state write and read ``model()`` by save_pretrained instead of
    accelerate's state dict of the prepared module (accelerate's documented hooks). Under FSDP
    accelerate has saved and loads the sharded model already; the Hugging Face copy is written
    besides and not read back."""

    def save(models: list, weights: list, output_dir: str) -> None:
        save_model(model(), tokenizer, Path(output_dir), write=accelerator.is_main_process)
        weights.clear()

    def load(models: list, input_dir: str) -> None:
        if accelerator.distributed_type in ("FSDP", "DEEPSPEED"):  # loaded by accelerate
            return
        load_model_weights(model(), Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator: Any, output_dir: Path, step: int) -> Path:
    """``save_state`` into ``checkpoints/checkpoint_<step>`` (replacing a partial one)."""
    path = output_dir / CHECKPOINTS / f"checkpoint_{step}"
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.iteration = step  # names the folder after the step
    accelerator.save_state()
    accelerator.wait_for_everyone()
    return path


def latest_checkpoint(output_dir: Path, custom_objects: int) -> Path | None:
    """The newest complete checkpoint: accelerate writes the registered objects last, so a
    folder without the last of them is an interrupted save and is never resumed from."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    last = f"custom_checkpoint_{custom_objects - 1}.pkl"
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / last).exists()]
    return max(found)[1] if found else None
