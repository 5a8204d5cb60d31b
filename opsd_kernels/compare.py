"""`opsd bench`: this library's fused loss beside the naive form, on the current device.

Both compute the same loss and gradients on the same random inputs; the table shows how close
the values are, and the time and incremental peak memory of one forward + backward each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opsd_kernels.losses import fused_linear_divergence
from opsd_kernels.profiling import peak_bytes
from opsd_kernels.reference import reference_reduce, reference_stats

VARIANTS: tuple[tuple[str, dict], ...] = (
    ("jsd beta=0.5", {"divergence": "jsd", "beta": 0.5}),
    ("forward KL, clip 0.05, tau 1.1", {"divergence": "forward_kl", "clip": 0.05,
                                        "temperature": 1.1}),
    ("reverse KL", {"divergence": "reverse_kl"}),
    ("sampled token", {"divergence": "sampled"}),
)


@dataclass
class Row:
    name: str
    loss: float
    loss_err: float
    grad_err: float
    time_ratio: float
    memory_ratio: float | None


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls (the caller has warmed fn up)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _compare(name: str, options: dict, h_s, w, h_t, labels, repeats: int) -> Row:
    def ours() -> torch.Tensor:
        h_s.grad = None
        loss = fused_linear_divergence(h_s, w, h_t, labels=labels, **options)
        loss.backward()
        return loss

    def naive() -> torch.Tensor:
        h_s.grad = None
        teacher = (h_t @ w.t()).float()
        stats = reference_stats((h_s @ w.t()).float(), teacher, labels, **options)
        loss = reference_reduce(stats["divergence"], labels != -100, token_weights=None,
                                reduction="mean", num_items=None, batch_shape=labels.shape)
        loss.backward()
        return loss

    loss = ours().detach()
    grad = h_s.grad.clone()
    loss_naive = naive().detach()
    grad_err = (grad.float() - h_s.grad.float()).abs().max().item()
    device = h_s.device
    (mem_ours, _), (mem_naive, _) = peak_bytes(ours, device), peak_bytes(naive, device)
    return Row(
        name,
        loss.item(),
        abs(loss.item() - loss_naive.item()),
        grad_err,
        _timed(ours, device, repeats) / _timed(naive, device, repeats),
        None if not (mem_ours and mem_naive) else mem_ours / mem_naive,
    )


def run_comparison(n: int | None = None, hidden: int | None = None,
                   vocab: int | None = None) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = (4096 if cuda else 1024) if n is None else n
    hidden = (4096 if cuda else 256) if hidden is None else hidden
    vocab = (128256 if cuda else 32768) if vocab is None else vocab
    for name, value in (("tokens", n), ("hidden", hidden), ("vocab", vocab)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    h_s = torch.randn(n, hidden, generator=gen).to(device, dtype).requires_grad_()
    h_t = (h_s.detach().float() + 0.5 * torch.randn(n, hidden, generator=gen).to(device))
    h_t = h_t.to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[: n // 8] = -100  # prompt tokens carry no loss

    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"opsd bench on {where}: N={n} tokens, H={hidden}, V={vocab}, {dtype}, shared frozen "
          "lm_head; naive = full [N, V] logits + the PyTorch reference (TRL's formulas)")
    header = f"{'loss':<32}{'value':>10}{'|diff|':>10}{'grad err':>10}{'time x':>9}{'mem x':>8}"
    print(header)
    print("-" * len(header))
    for name, options in VARIANTS:
        row = _compare(name, options, h_s, w, h_t, labels, repeats=3 if cuda else 1)
        mem = "n/a" if row.memory_ratio is None else f"{row.memory_ratio:.2f}"
        print(f"{row.name:<32}{row.loss:>10.5f}{row.loss_err:>10.1e}{row.grad_err:>10.1e}"
              f"{row.time_ratio:>9.2f}{mem:>8}")
    print("time x / mem x: this library / naive, same run (lower is better); "
          "mem = incremental peak of one forward + backward")
