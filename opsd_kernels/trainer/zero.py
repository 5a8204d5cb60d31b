"""The trainer under DeepSpeed ZeRO-2 and ZeRO-3 (``accelerate launch`` with configs/zero2.yaml or
zero3.yaml).

accelerate's ``backward`` under DeepSpeed calls the engine's backward and, at the accumulation
boundary, its step (clipping by the config's ``gradient_clipping``, optimizer step, zero_grad);
the prepared optimizer's ``step`` / ``zero_grad`` are no-ops. So the trainer drives the engine
itself: it marks the boundary on the last micro-batch, calls ``engine.backward`` without
DeepSpeed's 1 / gradient_accumulation_steps scaling (the loss is normalised by the global token
count already; the ``* num_processes`` undoes ZeRO's average over processes, as under DDP) and
``engine.step()`` once per optimizer step. The engine is told the trainer's
``gradient_accumulation_steps`` and clips at its ``max_grad_norm``: both are written into the
DeepSpeed config before ``prepare``, whatever the accelerate config says.

Non-finite steps: ZeRO's optimizer measures the global gradient norm in its step and skips the
update (and zeroes the gradients) when it is NaN / Inf, in fp32 as in fp16 and bf16 (DeepSpeed's
``bf16.check_grad_overflow``, on by default); the trainer reads that norm back, counts the step
as skipped (no scheduler or teacher update) and stops after ``max_nonfinite_steps`` in a row. A
non-finite loss whose gradients are finite is not caught by DeepSpeed: it is stepped, then
counted, and stops training the same way.

ZeRO-3 partitions every weight; a module's hooks gather its weights for its forward and again
for its backward, and a weight read elsewhere during the engine's forward (the lm_head by the
fused loss) is gathered as an external parameter of the running module, its gradient reduced
into the partitions like any other. So everything that reads weights runs inside the engine's
forward on every process at once: the loss (the objective is the engine's module), rollouts and
evaluation (`rollouts.InForwardEngine`, transformers' ``synced_gpus``), the shared-prefix passes
(module forwards like any other). The EMA teacher keeps the EMA of each process's partitions and
copies it into them for the teacher's passes (`teacher.Teacher`), after `release_gathered` has
partitioned every weight ZeRO holds gathered (prefetched, kept for reuse, persistent), and again
before the student's weights go back: so it refuses the settings under which ZeRO gathers from
somewhere else (hpZ's secondary partitions, quantized weights, parameters offloaded to NVMe).
Checkpoints are DeepSpeed's own (each process's partitions of the weights and optimizer state);
on another number of processes they are converted to DeepSpeed's universal format and loaded as
such (`as_universal`);
the Hugging Face copies (`checkpoint.save_model`) gather each module's weights in turn onto rank
0 (`sharding.full_state_dict`)."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opsd_kernels.trainer.config import OPSDConfig


def is_deepspeed(accelerator: Any) -> bool:
    return accelerator.distributed_type == "DEEPSPEED"


def is_zero3(accelerator: Any) -> bool:
    """Whether the accelerator runs DeepSpeed ZeRO-3 (every weight partitioned)."""
    return is_deepspeed(accelerator) and zero_config(accelerator).get("stage") == 3


def zero_config(accelerator: Any) -> dict:
    """The ``zero_optimization`` section of a DeepSpeed run's config (empty if it has none)."""
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})


def configure(accelerator: Any, config: OPSDConfig) -> None:
    """Refuse the ZeRO-3 settings the EMA teacher cannot use; give DeepSpeed the trainer's
    accumulation steps, clipping and a micro-batch size (for its throughput bookkeeping only: the
    trainer feeds the engine its own batches)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = zero_config(accelerator)
    if zero.get("stage") == 3 and config.teacher_mode == "ema":
        _check_ema_partitions(zero)
    ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    ds["gradient_clipping"] = 0.0 if config.max_grad_norm is None else config.max_grad_norm
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.problems_per_step * config.num_rollouts
    ds["train_batch_size"] = (ds["train_micro_batch_size_per_gpu"]
                              * config.gradient_accumulation_steps * accelerator.num_processes)
    # accelerate takes DeepSpeed's value with a warning when its own differs.
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps


def _check_ema_partitions(zero: dict) -> None:
    """The EMA teacher writes its values into each weight's partition (``ds_tensor``), which
    ZeRO-3 gathers from. Refuse the settings under which a gather reads something else: hpZ's
    secondary partitions, quantized partitions, partitions swapped out to NVMe."""
    hpz = zero.get("zero_hpz_partition_size", 1)
    offload = (zero.get("offload_param") or {}).get("device", "none")
    found = [f"zero_hpz_partition_size {hpz}" if hpz not in (1, None, "auto") else "",
             "zero_quantized_weights" if zero.get("zero_quantized_weights") else "",
             "offload_param to nvme" if str(offload) == "nvme" else ""]
    if any(found):
        raise ValueError(
            "teacher_mode: 'ema' under DeepSpeed ZeRO-3 writes the EMA into each weight's "
            f"partition, which {', '.join(f for f in found if f)} would bypass; turn that off or "
            "use teacher_mode 'fixed' or 'current'")


def release_gathered(accelerator: Any) -> None:
    """Partition again every ZeRO-3 weight gathered now (prefetched, kept for reuse,
    persistent, or an external parameter of the running forward), waiting for gathers in
    flight: the next use of each gathers it from its partition. ZeRO-3's own
    ``empty_partition_cache`` (the engine's also empties the device cache); no communication."""
    accelerator.deepspeed_engine_wrapped.engine.optimizer.empty_partition_cache()


def backward(accelerator: Any, loss: Any, last: bool) -> None:
    """One micro-batch's backward; ``last`` ends the accumulation (the engine reduces there)."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine.set_gradient_accumulation_boundary(is_boundary=last)
    # No 1 / gradient_accumulation_steps: the loss is a share of the step's global mean already.
    engine.backward(loss * accelerator.num_processes, scale_wrt_gas=False)


def step(accelerator: Any) -> tuple[float, bool]:
    """The engine's step (clip, update, zero_grad); the global gradient norm before clipping
    and whether the update was applied (DeepSpeed skips it on a non-finite norm)."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = math.nan if norm is None else float(norm)
    return norm, math.isfinite(norm)


@contextlib.contextmanager
def as_universal(accelerator: Any, path: Path) -> Iterator[Path]:
    """Checkpoint ``path`` for another number of processes: its DeepSpeed state
    (``pytorch_model/``, each process's partitions) converted by DeepSpeed's ``ds_to_universal``
    into the universal format, which the engine loads on any number of processes while its
    ``load_universal`` setting is on (inside this block). The main process writes the copy to
    ``<output_dir>/universal/<name>`` (outside ``checkpoints/``: never resumed from or rotated;
    the other files are linked) and removes it after the block."""
    target = path.parent.parent / "universal" / path.name
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for item in path.iterdir():
            if item.name != "pytorch_model":
                (target / item.name).symlink_to(item.resolve())
        # --inject_missing_state: the engine's checkpoints lack the universal_checkpoint_info
        # that Megatron-DeepSpeed saves (no tensor or pipeline parallelism here to describe).
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(path / "pytorch_model"), "--output_folder", str(target / "pytorch_model"),
             "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"resume: converting {path} to DeepSpeed's universal checkpoint "
                               f"failed: {last}")
    accelerator.wait_for_everyone()
    config = accelerator.deepspeed_engine_wrapped.engine._config
    saved = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield target
    finally:
        config.load_universal_checkpoint = saved
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(target)
            with contextlib.suppress(OSError):  # other conversions may be under way
                target.parent.rmdir()
