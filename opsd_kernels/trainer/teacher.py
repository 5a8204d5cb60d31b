"""The teacher's weights. `current`: the student's own (no grad); `fixed`: the initial policy,
read by disabling the LoRA adapters (the OPSD reference code's recommended mode); `ema`: an
exponential moving average of the trainable weights, swapped in for the teacher's passes (no
second model in memory: only the trainable tensors are kept twice, in fp32).

Under FSDP2 each process keeps the EMA of its own shards (the EMA of a shard is the shard of the
EMA): the teacher's passes copy them into the parameters' shards, which the passes' all-gathers
then read, and the student's shards are copied back after; checkpoints hold the whole EMA.
Under DeepSpeed ZeRO-3 the same with each weight's partition (``ds_tensor``), which ZeRO gathers
from: every gathered copy is released before the swap and after it (``release``), so that the
teacher's passes gather the EMA and the student's passes the student's weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from opsd_kernels import sharding
from opsd_kernels.trainer.config import TeacherMode


class Teacher:
    def __init__(self, mode: TeacherMode, model: nn.Module, ema_decay: float = 0.99) -> None:
        self.mode = mode
        self.model = model  # the top-level model (a peft model under LoRA)
        self.decay = ema_decay
        self.params: list[nn.Parameter] = []
        self.ema: list[torch.Tensor] = []
        self.release: Callable[[], None] | None = None  # ZeRO-3: partition every gathered copy
        if mode == "fixed" and not hasattr(model, "disable_adapter"):
            raise ValueError("teacher_mode: 'fixed' needs a peft model with LoRA adapters "
                             "(set lora: true)")
        self.reread_parameters()

    def reread_parameters(self, release: Callable[[], None] | None = None) -> None:
        """Take the trainable parameters (again): accelerate's FSDP2 preparation replaces each by
        its shard, a DTensor of the same values; DeepSpeed ZeRO-3's partitions them in place,
        and then needs ``release``, which partitions again every weight gathered at the time.
        The EMA starts from the parameters' values."""
        self.release = release
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.mode == "ema":
            self.places = sharding.places(self.model, self.params)
            self.ema = [sharding.local_shard(p).float().clone() for p in self.params]

    @property
    def shares_weights(self) -> bool:
        """Whether the teacher runs the student's exact weights (so it may reuse their KV)."""
        return self.mode == "current"

    def changes(self, param: nn.Parameter) -> bool:
        """Whether the teacher sees a different value of ``param`` than the student."""
        return self.mode == "ema" and param.requires_grad

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """The model computes as the teacher inside this block (call it under no_grad)."""
        if self.mode == "current":
            yield
        elif self.mode == "fixed":
            with self.model.disable_adapter():
                yield
        elif any(sharding.is_dtensor(p) for p in self.params):
            with self._ema_in_shards():
                yield
        elif any(sharding.is_zero3(p) for p in self.params):
            with self._ema_in_partitions():
                yield
        else:
            student = [p.data for p in self.params]
            for p, e in zip(self.params, self.ema, strict=True):
                p.data = e.to(p.dtype)
            try:
                yield
            finally:
                for p, s in zip(self.params, student, strict=True):
                    p.data = s

    @contextlib.contextmanager
    def _ema_in_shards(self) -> Iterator[None]:
        # FSDP2 all-gathers from the shards' storage, so the EMA is copied into it (and into the
        # copies gathered already: the root's during its forward); then the student's, back.
        student = [sharding.local_shard(p).clone() for p in self.params]
        sharding.assign(self.params, self.places, self.ema)
        try:
            yield
        finally:
            sharding.assign(self.params, self.places, student)

    @contextlib.contextmanager
    def _ema_in_partitions(self) -> Iterator[None]:
        # ZeRO-3 may hold a weight gathered across the swap (prefetched, kept for its next use,
        # persistent, or read by the loss): released, every copy is gathered anew from the
        # partition, the EMA for the teacher's passes and the student's weights after them.
        self.release()
        partitions = [sharding.local_shard(p) for p in self.params]
        student = [part.clone() for part in partitions]
        torch._foreach_copy_(partitions, self.ema)
        try:
            yield
        finally:
            self.release()
            torch._foreach_copy_(partitions, student)

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step: ema <- decay * ema + (1 - decay) * weights."""
        if self.mode == "ema":
            torch._foreach_lerp_(self.ema, [sharding.local_shard(p).float() for p in self.params],
                                 1.0 - self.decay)

    def state_dict(self) -> dict:
        """The whole EMA (under FSDP2 and ZeRO-3 gathered from every process's shards: all must
        call it)."""
        ema = [sharding.whole(e, p).clone() for e, p in zip(self.ema, self.params, strict=True)
               ] if self.mode == "ema" else []
        return {"mode": self.mode, "ema": ema}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint: saved with teacher_mode {state['mode']!r}, the "
                             f"config says {self.mode!r}")
        if self.mode == "ema":
            for e, saved, p in zip(self.ema, state["ema"], self.params, strict=True):
                e.copy_(sharding.shard_of(saved, p))
