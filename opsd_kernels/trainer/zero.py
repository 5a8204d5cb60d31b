"""The trainer under DeepSpeed ZeRO-2 (``accelerate launch`` with configs/zero2.yaml).

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

ZeRO-3 is refused: it partitions every weight, and the trainer's rollouts, shared prefixes, EMA
teacher and final save read weights outside the engine's forward (FSDP2 runs all of them)."""

from __future__ import annotations

import math
from typing import Any

from opsd_kernels.trainer.config import OPSDConfig


def is_deepspeed(accelerator: Any) -> bool:
    return accelerator.distributed_type == "DEEPSPEED"


def configure(accelerator: Any, config: OPSDConfig) -> None:
    """Refuse ZeRO-3; give DeepSpeed the trainer's accumulation steps, clipping and a micro-batch
    size (for its throughput bookkeeping only: the trainer feeds the engine its own batches)."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2):
        raise ValueError(
            f"accelerate config: DeepSpeed ZeRO stage {stage} is not supported by OPSDTrainer "
            "(ZeRO-3 partitions every weight, and the rollouts, shared prefixes, EMA teacher and "
            "final save read weights outside the engine's forward); use ZeRO-2 "
            "(opsd_kernels/trainer/configs/zero2.yaml) or FSDP2 (configs/fsdp2.yaml)")
    ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
    ds["gradient_clipping"] = 0.0 if config.max_grad_norm is None else config.max_grad_norm
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.problems_per_step * config.num_rollouts
    ds["train_batch_size"] = (ds["train_micro_batch_size_per_gpu"]
                              * config.gradient_accumulation_steps * accelerator.num_processes)
    # accelerate takes DeepSpeed's value with a warning when its own differs.
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps


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
