"""FSDP2 through accelerate on CPU processes (gloo), for the sharded tests.

accelerate (1.15) turns FSDP on only for accelerator device types: on CPU, under
``accelerate launch`` with an FSDP config, its state stays MULTI_CPU and the model would be
wrapped in DDP. `enable` switches that one field once accelerate has built its state; the rest is
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

    AcceleratorState.__init__ = init
