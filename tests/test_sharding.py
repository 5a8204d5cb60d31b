"""opsd_kernels.sharding in one process: plain modules pass through untouched; on a one-process
FSDP2 model (gloo) the mechanisms the sharded runs rely on can be watched directly: the head is
gathered for the block and freed after it without grad, kept for FSDP's post-backward with grad
(whose gradient lands in the sharded one), a gathered copy follows new shard values, and
whole / shard_of are inverse. The two-process runs are test_trainer_fsdp.py and
test_integrations_trl_fsdp.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from opsd_kernels import sharding


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6)
            self.head = nn.Linear(6, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(x))


def test_plain_modules_pass_through() -> None:
    model = Tiny()
    assert not sharding.is_sharded(model) and sharding.fsdp_units(model) == []
    with sharding.full_weight(model, model.head) as weight:
        assert weight is model.head.weight
    copy = sharding.full_copy(model, model.head)
    assert copy.data_ptr() == model.head.weight.data_ptr() and not copy.requires_grad
    assert sharding.run_as_forward(model, model, lambda: 7) == 7
    shard = sharding.local_shard(model.head.weight)
    assert sharding.whole(shard, model.head.weight) is shard
    assert sharding.shard_of(shard, model.head.weight) is shard
    with pytest.raises(ValueError, match="not a submodule"):
        sharding._owner(model, nn.Linear(1, 1))


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group exists already")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded() -> Tiny:
    from torch.distributed.fsdp import fully_shard

    model = Tiny()
    fully_shard(model.head, reshard_after_forward=True)
    fully_shard(model)
    return model


def test_the_head_is_gathered_for_the_block(one_process_group) -> None:
    model, reference = _sharded(), Tiny()
    assert sharding.is_sharded(model) and sharding.is_dtensor(model.head.weight)
    x = torch.randn(3, 4)

    def loss_of(m: Tiny, weight: torch.Tensor) -> torch.Tensor:
        return (m(x) @ weight.t()).square().sum()

    with torch.no_grad(), sharding.full_weight(model, model.head) as weight:
        assert not sharding.is_dtensor(weight) and torch.equal(weight, reference.head.weight)
    assert sharding.is_dtensor(model.head.weight)  # freed at the end of a no-grad block

    def step() -> torch.Tensor:
        with sharding.full_weight(model, model.head) as weight:
            return loss_of(model, weight)

    loss = sharding.run_as_forward(model, model, step)  # inside the root's forward
    assert not sharding.is_dtensor(model.head.weight)  # kept whole for the backward
    loss.backward()
    assert sharding.is_dtensor(model.head.weight)  # FSDP's post-backward freed it
    loss_of(reference, reference.head.weight).backward()
    torch.testing.assert_close(model.head.weight.grad.full_tensor(), reference.head.weight.grad)
    torch.testing.assert_close(model.body.weight.grad.full_tensor(), reference.body.weight.grad)
    copy = sharding.full_copy(model, model.head)
    assert torch.equal(copy, reference.head.weight) and sharding.is_dtensor(model.head.weight)


def test_new_shard_values_reach_gathered_copies(one_process_group) -> None:
    model = _sharded()
    params = [model.norm.weight, model.head.weight]
    where = sharding.places(model, params)
    assert where == [(model.norm, "weight"), (model.head, "weight")]
    ones = [torch.ones_like(sharding.local_shard(p)) for p in params]

    def inside_forward() -> None:
        # the root holds its own parameters (the norm) gathered during its forward
        assert not sharding.is_dtensor(model.norm.weight)
        sharding.assign(params, where, ones)
        assert torch.equal(model.norm.weight, torch.ones(6))

    sharding.run_as_forward(model, model, inside_forward)
    with torch.no_grad(), sharding.full_weight(model, model.head) as weight:
        assert torch.equal(weight, torch.ones(5, 6))
    full = torch.arange(30.0).reshape(5, 6)
    assert torch.equal(sharding.whole(sharding.shard_of(full, model.head.weight),
                                      model.head.weight), full)
