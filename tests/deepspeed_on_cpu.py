"""DeepSpeed through accelerate on CPU processes (gloo), for the sharded tests.

accelerate (1.15) picks a distributed backend only for accelerator devices unless asked to run
on the CPU, and asking for the CPU turns DeepSpeed off: with DeepSpeed on a machine without one
it finds no backend and counts a single process. `enable` gives it gloo there (the backend
DeepSpeed's own CPU accelerator uses), for any launched process count, one included; the rest
is accelerate's and DeepSpeed's own code. Call it before the first PartialState
(TrainingArguments, Accelerator).
"""

from __future__ import annotations

import functools
import os


@functools.cache
def enable() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    chosen = PartialState._prepare_backend

    @functools.wraps(chosen)
    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, kind = chosen(self, cpu, sagemaker_dp, backend)
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if backend is None and deepspeed and "WORLD_SIZE" in os.environ:
            return "gloo", DistributedType.MULTI_CPU
        return backend, kind

    PartialState._prepare_backend = prepare_backend


@functools.cache
def partition_small_weights() -> None:
    """ZeRO-3 keeps the weights smaller than stage3_param_persistence_threshold (1e5 elements by
    default) whole on every process, and every weight of the tiny test models is smaller: the
    configs accelerate builds get a threshold of 0, so that the heads are partitioned too."""
    from accelerate.utils import DeepSpeedPlugin

    built = DeepSpeedPlugin.__post_init__

    @functools.wraps(built)
    def post_init(self) -> None:
        built(self)
        zero = self.deepspeed_config.get("zero_optimization", {})
        if zero.get("stage") == 3:
            zero["stage3_param_persistence_threshold"] = 0

    DeepSpeedPlugin.__post_init__ = post_init
