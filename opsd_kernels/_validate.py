"""Argument checks of the public functions (losses, shared-prefix attention, the Hugging Face
prefix forward): every error names the argument and what is wrong."""

from __future__ import annotations

import math

import torch

from opsd_kernels.types import DIVERGENCES, REDUCTIONS, TOP_K_SOURCES

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_float_tensor(name: str, x: torch.Tensor, dims: tuple[int, ...],
                       dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
                       why: str = "; the float64 oracle lives in opsd_kernels.reference") -> None:
    """A float tensor with one of `dims` dimensions and a dtype in `dtypes` (`why` follows the
    list of supported dtypes in the error)."""
    check(isinstance(x, torch.Tensor), f"{name}: expected a tensor, got {type(x).__name__}")
    check(x.dim() in dims, f"{name}: expected {' or '.join(map(str, dims))} dims, got shape "
          f"{tuple(x.shape)}")
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    check(x.dtype in dtypes, f"{name}: dtype {x.dtype} is not supported ({names}{why})")


def check_index(name: str, x: object, shape: tuple[int, ...], device: torch.device,
                owner: str, meaning: str = "") -> torch.Tensor:
    """An integer tensor of `shape` on `device` (where `owner`, the argument or object that
    fixes the device, lives), returned as contiguous int64. `meaning` says where the shape comes
    from, for the error."""
    check(isinstance(x, torch.Tensor), f"{name}: expected an integer tensor, got "
          f"{type(x).__name__}")
    check(not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool,
          f"{name}: expected an integer tensor, got {x.dtype}")
    check(tuple(x.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}"
          f"{f' ({meaning})' if meaning else ''}, got {tuple(x.shape)}")
    check(x.device == device, f"{name}: on {x.device}, but {owner} is on {device}")
    return x.to(torch.int64).contiguous()


def lengths_or_full(name: str, lengths: object, count: int, full: int, device: torch.device,
                    owner: str, meaning: str = "") -> torch.Tensor:
    """`lengths` checked by `check_index` as [count], or `full` for every entry when None. Their
    range is the caller's check: it reads values (see `check_values`)."""
    if lengths is None:
        return torch.full((count,), full, dtype=torch.int64, device=device)
    return check_index(name, lengths, (count,), device, owner, meaning)


def check_values(ok: torch.Tensor, message: str) -> None:
    """A data-dependent check that never reads to the host on an accelerator: there it is a
    device-side assert (reported at the next synchronisation); on CPU it raises ValueError at
    once. Skipped while torch.compile traces (it would break the graph)."""
    if torch.compiler.is_compiling():
        return
    if ok.device.type != "cpu":
        torch._assert_async(ok.all(), message)
        return
    try:
        torch._assert_async(ok.all(), message)  # on CPU it checks at once
    except RuntimeError:
        raise ValueError(message) from None


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        check(dev == first, f"{name}: on {dev}, but {next(iter(devices))} is on {first}; "
              "all inputs must be on one device")


def check_options(
    *,
    divergence: str,
    beta: float,
    temperature: float,
    teacher_temperature: float | None,
    top_k: int | None,
    top_k_source: str,
    tail_bucket: bool,
    clip: float | None,
    logit_softcap: float | None,
    reduction: str,
    vocab: int,
    has_labels: bool,
    chunk_size: int | None,
) -> None:
    check(divergence in DIVERGENCES, f"divergence: expected one of {DIVERGENCES}, got "
          f"{divergence!r}")
    check(isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0,
          f"beta: must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta!r}")
    for name, tau in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
        if tau is not None:
            check(isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0,
                  f"{name}: must be a finite number > 0, got {tau!r}")
    if top_k is not None:
        check(isinstance(top_k, int) and 1 <= top_k <= vocab,
              f"top_k: must be an integer in [1, vocab size {vocab}], got {top_k!r}")
    check(top_k_source in TOP_K_SOURCES, f"top_k_source: expected one of {TOP_K_SOURCES}, got "
          f"{top_k_source!r}")
    check(not tail_bucket or top_k is not None, "tail_bucket: needs top_k to be set")
    if clip is not None:
        check(isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0,
              f"clip: must be a finite number > 0, got {clip!r}")
    if logit_softcap is not None:
        check(isinstance(logit_softcap, (int, float)) and math.isfinite(logit_softcap)
              and logit_softcap > 0, f"logit_softcap: must be a finite number > 0, got "
              f"{logit_softcap!r}")
    check(reduction in REDUCTIONS, f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if divergence == "sampled":
        check(has_labels, "labels: divergence='sampled' needs the sampled token ids as labels")
        check(top_k is None, "top_k: not defined for divergence='sampled' (it reads one token)")
        check(clip is None, "clip: not defined for divergence='sampled'")
    if chunk_size is not None:
        check(isinstance(chunk_size, int) and chunk_size >= 1,
              f"chunk_size: must be a positive integer, got {chunk_size!r}")


def check_labels(labels: torch.Tensor, token_shape: torch.Size, vocab: int,
                 ignore_index: int) -> None:
    check(not labels.dtype.is_floating_point and labels.dtype != torch.bool,
          f"labels: expected an integer tensor, got {labels.dtype}")
    check(labels.shape == token_shape, f"labels: expected shape {tuple(token_shape)}, got "
          f"{tuple(labels.shape)}")
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; eager runs check it
    in_range = ((labels >= 0) & (labels < vocab)) | (labels == ignore_index)
    message = f"labels: values must be in [0, {vocab}) or equal ignore_index={ignore_index}"
    if labels.device.type == "cpu":
        check(bool(in_range.all()), message)
    else:
        torch._assert_async(in_range.all(), message)  # on device: no host synchronisation


def check_token_weights(weights: torch.Tensor, token_shape: torch.Size) -> None:
    check(weights.dtype.is_floating_point, f"token_weights: expected a float tensor, got "
          f"{weights.dtype}")
    check(weights.shape == token_shape, f"token_weights: expected shape {tuple(token_shape)}, got "
          f"{tuple(weights.shape)}")
    check(not weights.requires_grad, "token_weights: must not require grad (they are constants "
          "of the loss; .detach() them)")


def check_bias(name: str, bias: torch.Tensor, vocab: int, dtype: torch.dtype) -> None:
    check(bias.shape == (vocab,), f"{name}: expected shape ({vocab},), got {tuple(bias.shape)}")
    check(bias.dtype == dtype, f"{name}: dtype {bias.dtype} differs from its head's {dtype}")
