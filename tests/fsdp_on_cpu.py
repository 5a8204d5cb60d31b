"""FSDP2 through accelerate on CPU processes (gloo), for the sharded tests.

accelerate (1.15) turns FSDP on only for accelerator device types: on CPU, under
``accelerate launch`` with an FSDP config, its state stays MULTI_CPU and the model would be
wrapped in DDP. `enable` switches that one field once accelerate has built its state, and gives
the plugin the launch's mixed precision as accelerate does where it turns FSDP on itself
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)`` for bf16); the rest is
accelerate's own code (the plugin read from the launcher's environment, fsdp2_prepare_model, the
optimizer's parameter swap, save_state / load_state). Call it before the first Accelerator.
The field lives in PartialState's shared state too, which every later AcceleratorState() copies.
"""

from __future__ import annotations

import functools


@functools.cache
def enable() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    built = AcceleratorState.__init__

    @functools.wraps(built)
    def init(self, *args, fsdp_plugin=None, **kwargs) -> None:
        built(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":  # as accelerate does for the FSDP it turns on
                fsdp_plugin.set_mixed_precision(self._mixed_precision)

    AcceleratorState.__init__ = init
