"""Per-token log-probabilities of given tokens, straight from hidden states and the lm_head:
log p(y) = z_y / T - logsumexp(z / T) with z = h W^T, a chunk of rows at a time.

What policy-gradient losses (GRPO's -A exp(log p - log p_old)) and supervised cross-entropy
(-log p(y)) need from the head. Forward keeps one [N] log-sum-exp; backward recomputes each
chunk's logits and forms d log p(y) / dz = (onehot(y) - softmax(z / T)) / T in place, so the
workspace is O(chunk x V) whatever N is and [tokens x vocab] logits never exist.
"""

from __future__ import annotations

import torch

from opsd_kernels import _validate as v
from opsd_kernels.divergence_driver import DEFAULT_WORKSPACE_BYTES

__all__ = ["fused_linear_logprobs"]


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          temperature: float = 1.0, ignore_index: int = -100,
                          chunk_size: int | None = None) -> torch.Tensor:
    """log p(labels) under softmax(hidden @ weight.T / temperature), in fp32.

    Args:
        hidden: [N, H] or [B, T, H] final hidden states (fp32, bf16 or fp16).
        weight: [V, H] the lm_head, same dtype; trainable or frozen.
        labels: [N] or [B, T] token ids; positions equal to ``ignore_index`` get 0 and no
            gradient.
        temperature: divides the logits (GRPO scores its rollouts at the sampling temperature).
        chunk_size: rows per chunk; default: as many as fit the workspace (64 MiB of fp32
            logits on a CPU, 512 MiB on a GPU).

    Returns:
        [N] or [B, T] fp32 log-probabilities, differentiable with respect to ``hidden`` and
        ``weight`` (whichever requires grad).
    """
    v.check_float_tensor("hidden", hidden, (2, 3))
    v.check_float_tensor("weight", weight, (2,))
    token_shape = hidden.shape[:-1]
    v.check(weight.shape[1] == hidden.shape[-1], f"weight: shape {tuple(weight.shape)} does not "
            f"match hidden's hidden size {hidden.shape[-1]}")
    v.check(hidden.dtype == weight.dtype, f"hidden: dtype {hidden.dtype} differs from weight's "
            f"{weight.dtype}")
    v.check(isinstance(labels, torch.Tensor), f"labels: expected an integer tensor, got "
            f"{type(labels).__name__}")
    v.check_labels(labels, token_shape, weight.shape[0], ignore_index)
    v.check_same_device(hidden=hidden, weight=weight, labels=labels)
    v.check(isinstance(temperature, (int, float)) and temperature > 0 and temperature < float(
        "inf"), f"temperature: must be a finite number > 0, got {temperature!r}")
    v.check(chunk_size is None or (isinstance(chunk_size, int) and chunk_size > 0),
            f"chunk_size: must be a positive integer or None, got {chunk_size!r}")
    n = token_shape.numel()
    flat = hidden.reshape(n, hidden.shape[-1])
    rows = _chunk_rows(n, weight.shape[0], chunk_size, hidden.device)
    out = _LinearLogprobs.apply(flat, weight, labels.reshape(n).to(torch.int64),
                                float(temperature), int(ignore_index), rows)
    return out.reshape(token_shape)


def _chunk_rows(n: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    budget = DEFAULT_WORKSPACE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, min(n, budget // (4 * vocab)))


def _scaled_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T of one chunk (low-precision inputs are multiplied in their dtype, then
    promoted: the GEMM's accumulation is fp32 either way)."""
    z = (h @ weight.t()).float()
    return z if temperature == 1.0 else z.div_(temperature)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, rows):
        kept = labels != ignore_index
        safe = torch.where(kept, labels, 0)
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.zeros_like(out)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            z = _scaled_logits(hidden[part], weight, temperature)
            lse[part] = torch.logsumexp(z, dim=1)
            out[part] = z.gather(1, safe[part, None]).squeeze(1) - lse[part]
        out.masked_fill_(~kept, 0.0)
        ctx.save_for_backward(hidden, weight, safe, kept, lse)
        ctx.options = (temperature, rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe, kept, lse = ctx.saved_tensors
        temperature, rows = ctx.options
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if (
            need_w) else None
        coef = torch.where(kept, grad_out.float(), 0.0) / temperature
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            # d log p(y) / dz = (onehot(y) - p) / T, times the incoming gradient
            dz = _scaled_logits(hidden[part], weight, temperature).sub_(lse[part, None]).exp_()
            dz.neg_().scatter_add_(1, safe[part, None], torch.ones_like(dz[:, :1]))
            dz.mul_(coef[part, None])
            if need_h:
                grad_h[part] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), hidden[part].float())
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None
