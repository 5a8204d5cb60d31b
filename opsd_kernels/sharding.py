"""Whole parameters out of sharded ones, for code that reads a weight outside the forward of the
module that owns it. The fused losses do: they stand in for the lm_head's forward and read
``lm_head.weight`` directly, which under sharded data parallelism holds only this rank's shard.

- FSDP2 (`torch.distributed.fsdp.fully_shard`; accelerate's ``fsdp_version: 2``): outside its
  unit's forward a parameter is a DTensor shard. `full_weight` calls ``unshard()`` on the FSDP
  module that owns it, so the attribute holds the whole parameter FSDP's hooks know about. A
  gradient that reaches it is reduce-scattered into the sharded gradient by FSDP's own
  post-backward, which also frees the gathered copy (the backward of a recomputing loss may
  still read it until then); without grad the copy is freed when the block ends. Where the
  owning unit is unsharded already (the root during its forward, a unit whose forward ran
  without resharding), the parameter is whole and used as it is.
- DeepSpeed ZeRO-3: inside the DeepSpeed engine's forward, reading a partitioned parameter of
  another module makes ZeRO gather it and register it with the running module (its "external
  parameter" detection), so it is whole for the forward and again for the backward, and its
  gradient goes to ZeRO's partitioned gradients like any other; `full_weight` then uses it as it
  is. Outside a forward and without grad (a teacher's head), it is gathered by
  ``deepspeed.zero.GatheredParameters`` (``modifier_rank=None``: read only, nothing is broadcast
  back) for the block; with grad it is refused, as a backward could not find it whole.
- Anything else (one process, DDP, ZeRO-1/2): the parameter itself.

The shard-local helpers (`local_shard`, `whole`, `shard_of`) give an EMA teacher the values each
process stores: an FSDP2 DTensor's local tensor, or ZeRO-3's partition ``ds_tensor`` (a flat
slice of the flattened parameter, zero-padded on the last process), which ZeRO gathers from.

Everything here is a no-op without torch.distributed, and never imports deepspeed unless a
parameter carries ZeRO-3's attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

_T = TypeVar("_T")


# --- what kind of sharding ---------------------------------------------------------------------


def _fsdp_module_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_fsdp_unit(module: nn.Module) -> bool:
    """Whether ``module`` was given to FSDP2's ``fully_shard`` (it owns a shard group)."""
    kind = _fsdp_module_type()
    return kind is not None and isinstance(module, kind)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in ``model`` (``model`` included), outermost first."""
    return [m for m in model.modules() if is_fsdp_unit(m)]


def is_dtensor(tensor: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_zero3(param: Any) -> bool:
    """Whether ``param`` is managed by DeepSpeed ZeRO-3 (it carries ZeRO's partition id)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` lives in shards across processes (FSDP2 or ZeRO-3),
    so that every process must take part in each of its forward passes."""
    return bool(fsdp_units(model)) or any(is_zero3(p) for p in model.parameters())


# --- the whole weight --------------------------------------------------------------------------


def _owner(root: nn.Module, module: nn.Module) -> nn.Module:
    """The innermost FSDP unit on the way from ``root`` down to ``module`` (``module`` included):
    the one whose shard group holds ``module``'s own parameters."""
    path = _path(root, module)
    if not path:
        raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")
    owners = [m for m in path if is_fsdp_unit(m)]
    if not owners:
        raise RuntimeError(f"{type(module).__name__}'s parameters are DTensors, but no module from "
                           f"{type(root).__name__} down to it was given to fully_shard")
    return owners[-1]


def _path(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    """The modules from ``root`` down to ``target``, both included."""
    if root is target:
        return [root]
    for child in root.children():
        if child is target or any(m is target for m in child.modules()):
            return [root, *_path(child, target)]
    return []


@contextlib.contextmanager
def full_weight(root: nn.Module, module: nn.Module, name: str = "weight") -> Iterator[torch.Tensor]:
    """``module.<name>`` whole for the block, gathered from its shards if needed.

    Args:
        root: the outermost module of the model (the prepared one: the FSDP root).
        module: the module holding the parameter (e.g. the lm_head).
        name: the parameter's attribute name.

    Yields:
        The whole parameter: under FSDP2 the unsharded parameter FSDP's hooks track, under
        ZeRO-3 the gathered one, else the parameter itself. Gradients into it reach the
        sharded gradient through FSDP's or ZeRO's own reduction.
    """
    param = getattr(module, name)
    if is_dtensor(param):
        owner = _owner(root, module)
        owner.unshard()
        try:
            yield getattr(module, name)
        finally:
            # With grad, FSDP's post-backward reduce-scatters the gradient and reshards; a loss
            # that recomputes in backward still finds the whole weight until then.
            if not torch.is_grad_enabled():
                owner.reshard()
        return
    if is_zero3(param) and not _zero3_gathered(param):
        if torch.is_grad_enabled():
            # Gathered for the block only, the weight would be partitioned again when a
            # recomputing backward reads it; inside the engine's forward ZeRO keeps it.
            raise RuntimeError(
                f"{type(module).__name__}.{name} is partitioned by DeepSpeed ZeRO-3: read it "
                "inside the forward of the DeepSpeed engine (sharding.run_as_forward), where "
                "ZeRO gathers it for the forward and again for the backward")
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield getattr(module, name)
        return
    yield param


def _zero3_gathered(param: Any) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status != ZeroParamStatus.NOT_AVAILABLE


def full_copy(root: nn.Module, module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` whole and detached, for a weight that is only read (a separate
    teacher's head): the parameter itself when it is whole, else a gathered copy, the shards
    left as they were (a collective under FSDP2 and ZeRO-3)."""
    param = getattr(module, name)
    # A whole FSDP2 parameter is a gathered copy FSDP may free later: copied too.
    sharded = is_dtensor(param) or is_zero3(param) or any(is_fsdp_unit(m)
                                                          for m in _path(root, module))
    if not sharded:
        return param.detach()
    with torch.no_grad(), full_weight(root, module, name) as gathered:
        return gathered.detach().clone()


def run_as_forward(wrapper: nn.Module, inner: nn.Module, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` as the forward of ``inner``, called by ``wrapper``'s forward.

    A DDP / DeepSpeed wrapper or an FSDP2 root does its bookkeeping in its forward (gradient-
    sync preparation; the root's unshard and the hooks that reduce-scatter its gradients), which
    a direct call of a submodule would skip. For a plain module (or a torch.compile'd one, whose
    compiled forward would trace ``fn``) this is just ``fn()``.
    """
    plain = wrapper is inner or getattr(wrapper, "_orig_mod", None) is inner
    if plain and not is_fsdp_unit(inner):
        return fn()
    own = inner.__dict__.get("forward")

    def restore() -> None:
        if own is None:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = own

    def redirected(*_args: Any, **_kwargs: Any) -> _T:
        restore()  # fn may call the module's real forward
        return fn()

    inner.forward = redirected
    try:
        return wrapper()
    finally:
        restore()


# --- shard-local values ------------------------------------------------------------------------


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The values of ``param`` this process stores, as a plain tensor that aliases them: the
    local tensor of an FSDP2 DTensor, ZeRO-3's partition (``ds_tensor``: a flat slice of the
    flattened parameter, zero-padded on the last process), else the parameter's data. In-place
    changes to it are what the next all-gather reads."""
    if is_dtensor(param):
        return param.detach().to_local()
    if is_zero3(param):
        return param.ds_tensor.detach()
    return param.detach()


def whole(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose shard on this process is ``local``, sharded like the parameter
    ``like`` (a collective under FSDP2 and ZeRO-3: every process calls it); ``local`` itself
    otherwise."""
    if is_zero3(like):
        group = like.ds_process_group
        parts = [torch.empty_like(local)
                 for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)[: like.ds_numel].view(like.ds_shape)
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the whole tensor ``full``, sharded like the parameter ``like``
    (no communication: every process holds ``full``); ``full`` itself otherwise."""
    if is_zero3(like):
        size = like.ds_tensor.numel()
        start = torch.distributed.get_rank(like.ds_process_group) * size
        flat = full.reshape(-1)[start: start + size]
        return torch.nn.functional.pad(flat, (0, size - flat.numel())).to(like.ds_tensor.device)
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device)
    return distribute_tensor(full, like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def places(model: nn.Module, params: list[nn.Parameter]) -> list[tuple[nn.Module, str]]:
    """Where each of ``params`` is registered in ``model`` (one of the places of a tied one):
    the attribute through which FSDP2 swaps a gathered copy in and out."""
    found: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            found.setdefault(id(param), (module, name))
    return [found[id(p)] for p in params]


@torch.no_grad()
def assign(params: list[nn.Parameter], where: list[tuple[nn.Module, str]],
           shards: list[torch.Tensor]) -> None:
    """Give each parameter the values whose part on this process is ``shards[i]`` (its whole
    values when it is not sharded): into its local shard, which FSDP2's next all-gather reads,
    and into the gathered copy its unit holds right now, if any. FSDP frees such a copy only after
    the forward or the backward (never during the forward for the root and the units that keep
    their weights until backward), so it is written too: all-gathering the new values is a
    collective, which every process runs for the same parameters."""
    for param, (module, name), shard in zip(params, where, shards, strict=True):
        local_shard(param).copy_(shard)
        current = getattr(module, name)
        if current is not param and is_dtensor(param):
            current.copy_(whole(shard, param))


# --- whole state dicts -------------------------------------------------------------------------


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded ``model``, gathered by every process (a collective:
    each one must call it) onto the CPU of rank 0 (the others get an empty dict); None when
    ``model`` is not sharded (its own ``state_dict()`` is whole). FSDP2: torch.distributed.
    checkpoint's get_model_state_dict. ZeRO-3: each module's own parameters gathered in turn
    (``deepspeed.zero.GatheredParameters``, read only), so no more than one module's weights are
    whole at a time besides rank 0's CPU copy."""
    if fsdp_units(model) or any(is_dtensor(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    if not any(is_zero3(p) for p in model.parameters()):
        return None
    import deepspeed

    main = torch.distributed.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        dot = f"{prefix}." if prefix else ""
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None,
                                               enabled=bool(own)):
            if main:
                out.update({dot + n: p.detach().cpu().clone() for n, p in own})
        if main:
            skip = module._non_persistent_buffers_set
            out.update({dot + n: b.detach().cpu().clone()
                        for n, b in module.named_buffers(recurse=False) if n not in skip})
    return out
