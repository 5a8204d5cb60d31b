"""One rank of test_divergence_vocab_parallel.py (run by torchrun, gloo on CPU): every case's
loss and gradients from this rank's slice of the head, against the float64 oracle on the full
logits. Writes the largest relative errors of each case to OUT/rank-R.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_kernels.divergence_vocab_parallel import vocab_parallel_linear_divergence
from opsd_kernels.reference.divergence import reference_reduce, reference_stats

N, H, V = 29, 16, 37  # odd sizes: ragged slices for 2 and 3 ranks

CASES = {
    "jsd": dict(divergence="jsd", beta=0.5),
    "jsd-0.1-temperatures": dict(divergence="jsd", beta=0.1, temperature=0.7,
                                 teacher_temperature=1.3),
    "jsd-beta-0": dict(divergence="jsd", beta=0.0),
    "jsd-beta-1": dict(divergence="jsd", beta=1.0),
    "forward_kl-clip": dict(divergence="forward_kl", clip=0.05),
    "forward_kl-softcap": dict(divergence="forward_kl", logit_softcap=3.0, temperature=1.1),
    "reverse_kl": dict(divergence="reverse_kl"),
    "reverse_kl-clip-sum": dict(divergence="reverse_kl", clip=0.02, reduction="sum"),
    "jsd-clip-weights": dict(divergence="jsd", clip=0.01, weights=True),
    "sampled": dict(divergence="sampled"),
    "sampled-none": dict(divergence="sampled", reduction="none"),
    "jsd-none-weights": dict(divergence="jsd", reduction="none", weights=True),
    "jsd-trainable-head": dict(divergence="jsd", trainable=True),
    "forward_kl-teacher-head": dict(divergence="forward_kl", teacher_head=True, trainable=True),
    "jsd-no-labels": dict(divergence="jsd", no_labels=True),
    "jsd-chunked": dict(divergence="jsd", chunk_size=4, trainable=True),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def run_case(name: str, spec: dict, rank: int, world: int) -> dict[str, float]:
    spec = dict(spec)
    gen = torch.Generator().manual_seed(len(name) * 7919 + sum(map(ord, name)))
    h_s = torch.randn(N, H, generator=gen)
    h_t = h_s + 0.5 * torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 0.6
    w_t = torch.randn(V, H, generator=gen) * 0.6 if spec.pop("teacher_head", False) else None
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.2] = -100
    if spec.pop("no_labels", False):
        labels = None
    weights = torch.rand(N, generator=gen) + 0.5 if spec.pop("weights", False) else None
    trainable = spec.pop("trainable", False)
    chunk_size = spec.pop("chunk_size", 8)
    reduction = spec.setdefault("reduction", "mean")
    upstream = torch.randn(N, generator=gen) if reduction == "none" else None

    # The oracle: float64 on the full logits, autograd.
    h64 = h_s.double().requires_grad_()
    w64 = w.double().requires_grad_(trainable)
    wt64 = w64.detach() if w_t is None else w_t.double()
    options = {k: v for k, v in spec.items() if k != "reduction"}
    stats = reference_stats(h64 @ w64.T, h_t.double() @ wt64.T, labels, **options)
    valid = labels != -100 if labels is not None else torch.ones(N, dtype=torch.bool)
    want = reference_reduce(stats["divergence"], valid, token_weights=None if weights is None
                            else weights.double(), reduction=reduction, num_items=None,
                            batch_shape=(N,))
    (want * upstream.double() if upstream is not None else want).sum().backward()

    # This rank's slice.
    sizes = [len(c) for c in torch.arange(V).tensor_split(world)]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    hs = h_s.clone().requires_grad_()
    ws = w[rows].clone().requires_grad_(trainable)
    got = vocab_parallel_linear_divergence(
        hs, ws, h_t, None if w_t is None else w_t[rows], vocab_start=start, vocab_size=V,
        labels=labels, token_weights=weights, chunk_size=chunk_size, **spec)
    (got * upstream if upstream is not None else got).sum().backward()
    errors = {"loss": rel_err(got.detach(), want.detach()), "grad_hidden": rel_err(hs.grad,
                                                                                   h64.grad)}
    if trainable:
        errors["grad_weight"] = rel_err(ws.grad, w64.grad[rows])
    return errors


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {name: run_case(name, spec, rank, world) for name, spec in CASES.items()}
    (out / f"rank-{rank}.json").write_text(json.dumps({"world": world, "cases": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
