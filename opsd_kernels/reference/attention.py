"""Shared-prefix attention in plain PyTorch: the float64 oracle and the benchmark baseline.

Shapes (GQA: Hq = rep * Hkv, heads h * rep .. h * rep + rep - 1 of the query read kv head h):
    query [B, Hq, R, D], key / value [B, Hkv, R, D]          suffix rows, causal within a row
    prefix_key / prefix_value [G, Hkv, P, D]                  one right-padded prefix per group
    group_index [B], prefix_lengths [G] (1..P), suffix_lengths [B] (1..R)
Query r of row b attends to prefix positions [0, prefix_lengths[g]) of g = group_index[b] and to
suffix positions [0, r] of its own row; queries r >= suffix_lengths[b] are padding: output 0,
log-sum-exp 0, no gradient anywhere.

- `naive_prefix_attention`: the oracle. Concatenates [prefix K/V of the row's group; suffix K/V]
  per row, one mask, one softmax. `upcast=False` is plain PyTorch in the input dtype (Hugging
  Face's eager recipe), the baseline of the flash-attention accuracy rule.
- `sdpa_prefix_attention`: the plain approach the op replaces (prefix K/V repeated per row,
  torch SDPA over the concatenation with a mask): the benchmark baseline.

The PyTorch backend's own forms (two parts merged by log-sum-exp) are in
`opsd_kernels.ops.attention_torch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the 16-bit types and fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def with_defaults(query: Tensor, prefix_key: Tensor, prefix_lengths: Tensor | None,
                  suffix_lengths: Tensor | None, scale: float | None
                  ) -> tuple[Tensor, Tensor, float]:
    """(prefix_lengths, suffix_lengths, scale) with None meaning all P, all R and D ** -0.5."""
    b, r, d = query.shape[0], query.shape[2], query.shape[3]
    g, p = prefix_key.shape[0], prefix_key.shape[2]
    if prefix_lengths is None:
        prefix_lengths = torch.full((g,), p, dtype=torch.int64, device=query.device)
    if suffix_lengths is None:
        suffix_lengths = torch.full((b,), r, dtype=torch.int64, device=query.device)
    return prefix_lengths, suffix_lengths, d**-0.5 if scale is None else float(scale)


def naive_prefix_attention(
    query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor, prefix_value: Tensor,
    group_index: Tensor, prefix_lengths: Tensor | None = None,
    suffix_lengths: Tensor | None = None, *, scale: float | None = None, upcast: bool = True,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The oracle: per row, softmax over the concatenation [prefix of its group; suffix].

    upcast=True: the math runs in fp32 or wider (fp64 inputs stay fp64). upcast=False: scores
    and the value product in the input dtype, softmax in fp32 and its probabilities rounded
    back (what a plain PyTorch / Hugging Face eager attention does). Output in the input dtype;
    lse (if asked) in the math dtype, 0 on padded queries.
    """
    prefix_lengths, suffix_lengths, scale = with_defaults(query, prefix_key, prefix_lengths,
                                                          suffix_lengths, scale)
    b, hq, r, _ = query.shape
    hkv, p = prefix_key.shape[1], prefix_key.shape[2]
    rep = hq // hkv
    dtype = math_dtype(query.dtype) if upcast else query.dtype
    keys = torch.cat([prefix_key[group_index], key], dim=2).repeat_interleave(rep, dim=1)
    values = torch.cat([prefix_value[group_index], value], dim=2).repeat_interleave(rep, dim=1)
    scores = (query.to(dtype) @ keys.to(dtype).transpose(-1, -2)) * scale  # [B, Hq, R, P + R]
    pos = torch.arange(r, device=query.device)
    cols = torch.arange(p, device=query.device)
    prefix_ok = cols[None, :] < prefix_lengths[group_index][:, None]  # [B, P]
    causal = pos[None, :] <= pos[:, None]  # [R, R]
    allowed = torch.cat([prefix_ok[:, None, :].expand(b, r, p),
                         causal[None].expand(b, r, r)], dim=-1)[:, None]  # [B, 1, R, P + R]
    # Only key positions are masked: every query keeps at least its own position, so no row is
    # all -inf (a NaN softmax would poison the gradients even where the output is zeroed).
    scores = scores.float() if not upcast else scores
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).to(dtype)
    out = probs @ values.to(dtype)
    valid = (pos[None, :] < suffix_lengths[:, None])[:, None, :, None]  # [B, 1, R, 1]
    out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
    out = out.to(query.dtype)
    if not return_lse:
        return out
    lse = torch.where(valid[..., 0], scores.logsumexp(-1), 0.0)
    return out, lse


def sdpa_prefix_attention(
    query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor, prefix_value: Tensor,
    group_index: Tensor, prefix_lengths: Tensor | None = None,
    suffix_lengths: Tensor | None = None, *, scale: float | None = None,
) -> Tensor:
    """The plain approach: repeat each group's prefix K/V per row, concatenate, and run torch
    SDPA with a boolean mask (GQA expanded). Padded queries give 0."""
    prefix_lengths, suffix_lengths, scale = with_defaults(query, prefix_key, prefix_lengths,
                                                          suffix_lengths, scale)
    b, hq, r, _ = query.shape
    hkv, p = prefix_key.shape[1], prefix_key.shape[2]
    keys = torch.cat([prefix_key[group_index], key], dim=2)
    values = torch.cat([prefix_value[group_index], value], dim=2)
    pos = torch.arange(r, device=query.device)
    prefix_ok = (torch.arange(p, device=query.device)[None, :]
                 < prefix_lengths[group_index][:, None])
    causal = pos[None, :] <= pos[:, None]
    mask = torch.cat([prefix_ok[:, None, :].expand(b, r, p), causal[None].expand(b, r, r)],
                     dim=-1)[:, None]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=hq != hkv)
    valid = (pos[None, :] < suffix_lengths[:, None])[:, None, :, None]
    return out * valid


def __getattr__(name: str):
    # The PyTorch backend's forms lived here before `opsd_kernels.ops.attention_torch`; their
    # old import path keeps working (looked up lazily: that module imports this one).
    if name in _MOVED:
        from opsd_kernels.ops import attention_torch

        return getattr(attention_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MOVED = ("prefix_attention_parts", "prefix_attention_backward", "fused_prefix_attention",
          "fused_prefix_attention_backward", "chunk_rows", "WORKSPACE_BYTES")
