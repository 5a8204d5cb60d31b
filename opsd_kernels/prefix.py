"""Shared-prefix forward for Hugging Face decoders: each prompt prefix runs through the model
once, and every rollout that shares it attends to one copy of its keys and values.

    out = shared_prefix_forward(model, prompt_ids, rollout_ids, group_index,
                                prompt_lengths, rollout_lengths)  # student, with grad
    with torch.no_grad():  # teacher = same weights, prompt + privileged solution
        teacher = extend_prefix(model, out.state, solution_ids, solution_lengths)
        t_out = shared_prefix_forward(model, teacher, rollout_ids, group_index,
                                      suffix_lengths=rollout_lengths)

A state is only valid for the weights that computed it (a teacher on frozen or EMA weights
needs its own `prefix_forward`).

How it plugs into transformers (public 5.x APIs only; tested on 5.23):

- The prefix pass runs the decoder on the prefixes with plain causal attention (torch SDPA,
  inside the same attention function, which records each layer's post-rotary key / value,
  [G, Hkv, P, D], not repeated for GQA, into a `PrefixState`). Right padding needs no mask
  there: under a causal mask a real token only sees earlier, real tokens; the padded tail is
  masked by the prefix lengths later on.
- The suffix pass selects the attention function registered as "opsd_shared_prefix" (with
  `set_attn_implementation`, restored afterwards) and hands it the `PrefixState` as a keyword
  argument of the decoder call, which transformers forwards untouched to the attention function.
  It then calls `opsd_kernels.attention.shared_prefix_attention`. No HF Cache is involved: its
  update() concatenates and rebinds, and gradient checkpointing drops it.
- Non-reentrant gradient checkpointing recomputes a layer during backward, after this module has
  restored the model's own attention implementation; the layers' checkpoint function is wrapped
  for the duration of the call so the recompute selects ours again. Reentrant checkpointing
  loses the gradients of tensors passed by keyword (the prefix K/V) and is refused.

transformers is imported lazily: `import opsd_kernels` stays free of it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opsd_kernels import _validate as v

ATTENTION_NAME = "opsd_shared_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_CALL_KWARG = "opsd_prefix_call"  # the keyword argument that carries a _Call to _attention

_REENTRANT = (
    "gradient checkpointing: reentrant checkpointing (use_reentrant=True, torch's default when "
    "unset) drops the gradients of the prefix keys / values, which the shared-prefix forward "
    "passes by keyword; enable it with model.gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False})"
)


@dataclass
class PrefixState:
    """Per-layer keys and values of a batch of prefixes (one per group), as the attention
    function receives them: after rotary embedding, not repeated for GQA, right-padded.

    Shapes: keys[l], values[l] [G, Hkv, P, D]; lengths [G] int64 (real tokens, >= 1);
    last_hidden [G, H] (final, post-norm hidden state of each prefix's last real token).
    Reusable for any number of suffix batches and extensions; it carries autograd history when
    it was computed with grad enabled (`detach()` gives a view without it).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor
    last_hidden: torch.Tensor
    config: Any = field(repr=False)

    @property
    def num_groups(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def detach(self) -> PrefixState:
        return replace(self, keys=[k.detach() for k in self.keys],
                       values=[v.detach() for v in self.values],
                       last_hidden=self.last_hidden.detach())


@dataclass
class SharedPrefixOutput:
    hidden_states: torch.Tensor  # [B, R, H] suffix tokens, final (post-norm) hidden states
    prefix_last_hidden: torch.Tensor  # [G, H]
    state: PrefixState


class _Call:
    """What one decoder call hands the attention function, by keyword argument.

    A plain class, not a dataclass: FSDP2 rebuilds the dataclasses and lists it finds in a
    unit's inputs (to hook the tensors in them), and each layer must record its keys and values
    into this very object."""

    def __init__(self, prefix: PrefixState | None, group_index: torch.Tensor | None,
                 suffix_lengths: torch.Tensor | None,
                 keys: list[torch.Tensor | None] | None = None,
                 values: list[torch.Tensor | None] | None = None) -> None:
        self.prefix = prefix  # None: plain causal self-attention (the prefix pass)
        self.group_index = group_index
        self.suffix_lengths = suffix_lengths
        self.keys = keys  # filled per layer when capturing
        self.values = values
        self.units: list[nn.Module | None] = []  # each layer's FSDP2 unit, if it is one


# --- the attention function ------------------------------------------------------------------


def _attention_op() -> Callable[..., torch.Tensor]:
    from opsd_kernels.attention import shared_prefix_attention

    return shared_prefix_attention


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    call = kwargs.get(_CALL_KWARG)
    if not isinstance(call, _Call):
        raise RuntimeError(
            f"attn_implementation {ATTENTION_NAME!r} only works inside opsd_kernels.prefix calls "
            "(it reads the prefix keys / values they pass); restore the model's own "
            "implementation with model.set_attn_implementation('sdpa')")
    if dropout:
        raise NotImplementedError("the shared-prefix forward has no attention dropout; set "
                                  "config.attention_dropout = 0.0 or call model.eval()")
    query, key, value = _autocast_inputs(query, key, value)
    layer = module.layer_idx
    # Only the first run of a layer records: a checkpoint recompute must not rebind the state.
    if call.keys is not None and call.keys[layer] is None:
        call.keys[layer], call.values[layer] = key, value
        unit = call.units[layer] if call.units else None
        if unit is not None and key.requires_grad:
            _gather_in_backward(unit, key, value)
    if call.prefix is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
    else:
        out = _attention_op()(query, key, value,
                              *_autocast_inputs(call.prefix.keys[layer], call.prefix.values[layer]),
                              call.group_index, call.prefix.lengths,
                              call.suffix_lengths, scale=scaling)
    return out.transpose(1, 2), None


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the tensors in its dtype, as autocast gives sdpa (one of its
    lower-precision ops): Qwen3's q / k norms return fp32 queries and keys beside bf16 values,
    which the shared-prefix op would refuse. Outside autocast, unchanged."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)


@contextlib.contextmanager
def _attention_selected(decoder: nn.Module) -> Iterator[None]:
    previous = decoder.config._attn_implementation
    if previous == ATTENTION_NAME:  # nested: a checkpoint recompute inside our own call
        yield
        return
    decoder.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        decoder.set_attn_implementation(previous)


def _uses_reentrant(func: Any) -> bool | None:
    """True / False when the checkpoint function says, None when it cannot be told."""
    from torch.utils.checkpoint import checkpoint

    keywords: dict[str, Any] = {}
    while isinstance(func, functools.partial):
        keywords = {**func.keywords, **keywords}
        func = func.func
    if "use_reentrant" in keywords:
        return keywords["use_reentrant"] is not False
    return True if func is checkpoint else None


@contextlib.contextmanager
def _checkpointing_guarded(model: nn.Module, decoder: nn.Module) -> Iterator[None]:
    grad_enabled = torch.is_grad_enabled()

    def guard(func: Callable[..., Any]) -> Callable[..., Any]:
        def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            def run(*a: Any, **k: Any) -> Any:
                # Reentrant checkpointing runs the forward under no_grad: a backstop for
                # checkpoint functions whose use_reentrant cannot be read.
                if grad_enabled and not torch.is_grad_enabled():
                    raise ValueError(_REENTRANT)
                with _attention_selected(decoder):
                    return function(*a, **k)

            return func(run, *args, **kwargs)

        return checkpoint

    patched = []
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = guard(func)
            patched.append((module, func))
    try:
        yield
    finally:
        for module, func in patched:
            module._gradient_checkpointing_func = func


def _gather_in_backward(unit: nn.Module, *recorded: torch.Tensor) -> None:
    """Recorded keys / values leave their layer through the state, not as its output, so
    FSDP2's pre-backward hooks (on a unit's outputs) miss them: a layer whose output is not used
    (the last one of a prefix whose last hidden state is not read) would run the backward of its
    key / value projections on freed weights. The layer's unit gathers them again first (no-op
    when they are gathered); FSDP's post-backward reduce-scatters and frees as usual."""

    def gather(grad: torch.Tensor) -> torch.Tensor:
        unit.unshard()
        return grad

    for tensor in recorded:
        tensor.register_hook(gather)


def _run(model: nn.Module, decoder: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
         call: _Call) -> torch.Tensor:
    from opsd_kernels.sharding import is_fsdp_unit

    call.units = [layer if is_fsdp_unit(layer) else None for layer in decoder.layers]
    with _attention_selected(decoder), _checkpointing_guarded(model, decoder):
        out = decoder(input_ids=ids, position_ids=positions, use_cache=False,
                      **{_CALL_KWARG: call})
    return out.last_hidden_state


# --- checks ----------------------------------------------------------------------------------


def check_prefix_model(model: nn.Module, max_length: int | None = None) -> None:
    """Raise unless the shared-prefix forward can run `model` on sequences (prefix + suffix) of
    up to `max_length` tokens: a supported Hugging Face decoder whose sliding window, if any,
    is no shorter than max_length (where it has no effect) and whose max_position_embeddings
    covers it.

    Raises:
        NotImplementedError: an unsupported model type, or a sliding window shorter than
            max_length (features the shared-prefix forward lacks).
        ValueError: no decoder found, or max_length beyond max_position_embeddings.
    """
    _decoder(model)
    if max_length is not None:
        v.check(isinstance(max_length, int) and max_length >= 1, f"max_length: must be a "
                f"positive integer, got {max_length!r}")
        _check_total_length(model.config, max_length, "max_length")


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder (the module with .layers and the final norm) of a supported model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"model: model_type {model_type!r} is not supported by the shared-prefix forward "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    v.check(hasattr(decoder, "layers") and hasattr(decoder, "set_attn_implementation"),
            f"model: no Hugging Face decoder found in {type(model).__name__}")
    return decoder


def _check_model(model: nn.Module) -> nn.Module:
    """`check_prefix_model` and what depends on the call's state (training, grad mode); the
    decoder."""
    decoder = _decoder(model)
    config = model.config
    if model.training and getattr(config, "attention_dropout", 0.0):
        raise NotImplementedError("model: attention dropout is not supported by the "
                                  "shared-prefix forward; set config.attention_dropout = 0.0")
    if torch.is_grad_enabled():
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) and module.training:
                v.check(not _uses_reentrant(getattr(module, "_gradient_checkpointing_func",
                                                    None)), _REENTRANT)
    _register()
    return decoder


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Qwen2 / Qwen3: only the layers marked sliding use it
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


def _check_total_length(config: Any, longest: int, what: str) -> None:
    limit = config.max_position_embeddings
    v.check(longest <= limit, f"{what}: {longest} tokens in one sequence exceed the model's "
            f"max_position_embeddings {limit}")
    window = _sliding_window(config)
    if window is not None and longest > window:
        raise NotImplementedError(
            f"model: sliding-window attention (window {window}) is not supported by the "
            f"shared-prefix forward, and {what} reach {longest} tokens (> window); only "
            "sequences no longer than the window (where it has no effect) are accepted")


def _device(decoder: nn.Module) -> torch.device:
    return next(decoder.parameters()).device


def _check_ids(name: str, ids: Any, device: torch.device, rows: int | None = None) -> None:
    v.check(isinstance(ids, torch.Tensor), f"{name}: expected a tensor of token ids, got "
            f"{type(ids).__name__}")
    v.check(ids.dim() == 2, f"{name}: expected shape [rows, tokens] (right-padded), got "
            f"{tuple(ids.shape)}")
    v.check(not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool,
            f"{name}: expected integer token ids, got {ids.dtype}")
    v.check(ids.shape[0] > 0 and ids.shape[1] > 0, f"{name}: empty (shape "
            f"{tuple(ids.shape)}); every prefix and suffix needs at least one token")
    if rows is not None:
        v.check(ids.shape[0] == rows, f"{name}: expected {rows} rows (one per prefix group), "
                f"got {ids.shape[0]}")
    v.check(ids.device == device, f"{name}: on {ids.device}, the model is on {device}")


def _lengths(name: str, lengths: Any, ids: torch.Tensor,
             pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lengths of checked shape as int64 (default: the full width) and, when given, the values
    their checks need ([min, max, rows that look left-padded]), still on the device: a call
    reads all of its values at once (`_read`) and then runs `_check_lengths`."""
    rows, width = ids.shape
    checked = v.lengths_or_full(name, lengths, rows, width, ids.device, "the model",
                                "one per row of the ids")
    if lengths is None:
        return checked, None
    left = torch.zeros((), dtype=torch.int64, device=ids.device)
    if pad_token_id is not None:
        left = ((ids[:, 0] == pad_token_id) & (checked < width)).sum()
    return checked, torch.stack([checked.min(), checked.max(), left])


def _read(*values: torch.Tensor | None) -> list[list[int] | None]:
    """The values of a call's data checks, read to the host in one transfer (one sync)."""
    present = [x.reshape(-1) for x in values if x is not None]
    flat = torch.cat(present).tolist() if present else []
    out: list[list[int] | None] = []
    for x in values:
        if x is None:
            out.append(None)
        else:
            out.append(flat[:x.numel()])
            flat = flat[x.numel():]
    return out


def _check_lengths(name: str, stats: list[int] | None, ids_name: str, ids: torch.Tensor,
                   pad_token_id: int | None) -> int:
    """The checks of `_lengths` on the values read; returns the longest length."""
    width = ids.shape[1]
    if stats is None:
        return width
    lo, hi, n_left = stats
    v.check(lo >= 1, f"{name}: every length must be >= 1 (empty rows are not supported), got "
            f"{lo}")
    v.check(hi <= width, f"{name}: length {hi} exceeds the padded width {width} of {ids_name}")
    v.check(n_left == 0, f"{ids_name}: {n_left} row(s) start with pad_token_id {pad_token_id} "
            "and are shorter than the padded width, which looks like left padding; pad on the "
            "right (real tokens first) and pass the real lengths")
    return hi


def _check_state(state: Any, config: Any, device: torch.device) -> None:
    v.check(isinstance(state, PrefixState), f"state: expected a PrefixState, got "
            f"{type(state).__name__}")
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)
    k = state.keys[0] if state.keys else None
    v.check(len(state.keys) == len(state.values) == config.num_hidden_layers and k is not None
            and k.shape[1] == config.num_key_value_heads and k.shape[3] == head_dim,
            "state: its keys / values do not fit this model (layers, key-value heads or head "
            "dim differ); it must come from the same model (and the same weights)")
    v.check(k.device == device, f"state: on {k.device}, the model is on {device}")


def _clamped_positions(start: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    # Padded tokens repeat the last real position: they never reach real tokens, and this keeps
    # every position id below max_position_embeddings (dynamic RoPE rescales past it).
    steps = torch.arange(width, device=lengths.device)
    return start[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)


def _last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


# --- public API ------------------------------------------------------------------------------


def prefix_forward(model: nn.Module, prefix_ids: torch.Tensor,
                   prefix_lengths: torch.Tensor | None = None) -> PrefixState:
    """Run the prefixes through the model once and keep every layer's keys / values.

    Args:
        model: a Hugging Face Llama / Qwen2 / Qwen3 / Mistral model (*ForCausalLM or base).
        prefix_ids: [G, P] token ids, right-padded.
        prefix_lengths: [G] integer real lengths in [1, P]; None means all P.

    Returns:
        The `PrefixState`; computed with grad when grad is enabled.
    """
    decoder = _check_model(model)
    config = model.config
    _check_ids("prefix_ids", prefix_ids, _device(decoder))
    lengths, stats = _lengths("prefix_lengths", prefix_lengths, prefix_ids, config.pad_token_id)
    (stats,) = _read(stats)
    longest = _check_lengths("prefix_lengths", stats, "prefix_ids", prefix_ids,
                             config.pad_token_id)
    _check_total_length(config, longest, "prefix_lengths")
    return _prefix_pass(model, decoder, prefix_ids, lengths)


def _prefix_pass(model: nn.Module, decoder: nn.Module, ids: torch.Tensor,
                 lengths: torch.Tensor) -> PrefixState:
    n_layers = model.config.num_hidden_layers
    call = _Call(None, None, None, [None] * n_layers, [None] * n_layers)
    positions = _clamped_positions(torch.zeros_like(lengths), lengths, ids.shape[1])
    hidden = _run(model, decoder, ids, positions, call)
    return PrefixState(list(call.keys), list(call.values), lengths, _last(hidden, lengths),
                       model.config)


def _suffix_pass(model: nn.Module, decoder: nn.Module, state: PrefixState, ids: torch.Tensor,
                 group_index: torch.Tensor, lengths: torch.Tensor, *,
                 capture: bool) -> tuple[torch.Tensor, _Call]:
    n_layers = model.config.num_hidden_layers
    slots = [None] * n_layers if capture else None
    call = _Call(state, group_index, lengths, slots, list(slots) if capture else None)
    positions = _clamped_positions(state.lengths[group_index], lengths, ids.shape[1])
    return _run(model, decoder, ids, positions, call), call


def _suffix_values(config: Any, device: torch.device, prefix_lengths: torch.Tensor,
                   suffix_ids: Any, group_index: Any, suffix_lengths: Any
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Shape checks of the suffix arguments; (suffix lengths, group_index as int64, the values
    of the lengths' checks, [min group, max group, longest prefix + suffix]) for
    `_check_suffix`."""
    _check_ids("suffix_ids", suffix_ids, device)
    group_index = v.check_index("group_index", group_index, (suffix_ids.shape[0],), device,
                                "the model", "one per row of suffix_ids")
    lengths, stats = _lengths("suffix_lengths", suffix_lengths, suffix_ids, config.pad_token_id)
    # Clamped so that an out-of-range group reaches its own check instead of an index error.
    safe = group_index.clamp(0, prefix_lengths.shape[0] - 1)
    groups = torch.stack([group_index.min(), group_index.max(),
                          (prefix_lengths[safe] + lengths).max()])
    return lengths, group_index, stats, groups


def _check_suffix(config: Any, groups: int, suffix_ids: torch.Tensor,
                  stats: list[int] | None, group_values: list[int]) -> None:
    _check_lengths("suffix_lengths", stats, "suffix_ids", suffix_ids, config.pad_token_id)
    lo, hi, longest = group_values
    v.check(0 <= lo and hi < groups, f"group_index: values must lie in [0, {groups}) (one per "
            f"prefix group), got range [{lo}, {hi}]")
    _check_total_length(config, longest, "prefix_lengths + suffix_lengths")


def shared_prefix_forward(model: nn.Module, prefix_ids: torch.Tensor | PrefixState,
                          suffix_ids: torch.Tensor, group_index: torch.Tensor,
                          prefix_lengths: torch.Tensor | None = None,
                          suffix_lengths: torch.Tensor | None = None) -> SharedPrefixOutput:
    """Final hidden states of [prefix ; suffix] sequences, each prefix computed once.

    Row b is the sequence prefix_ids[group_index[b], :prefix_lengths[g]] followed by
    suffix_ids[b, :suffix_lengths[b]]; the result equals the model's plain forward of that
    sequence (at the suffix tokens, and at each prefix's last token), gradients included.

    Args:
        model: a Hugging Face Llama / Qwen2 / Qwen3 / Mistral model (*ForCausalLM or base),
            no sliding window shorter than the sequences, no attention dropout; gradient
            checkpointing only non-reentrant.
        prefix_ids: [G, P] token ids, right-padded; or a `PrefixState` from an earlier call,
            `prefix_forward` or `extend_prefix` (then prefix_lengths must be None).
        suffix_ids: [B, R] token ids, right-padded.
        group_index: [B] integer in [0, G): the prefix of each suffix row.
        prefix_lengths: [G] integer in [1, P]; None means all P.
        suffix_lengths: [B] integer in [1, R]; None means all R.

    Returns:
        `SharedPrefixOutput` with hidden_states [B, R, H] (padded positions hold junk),
        prefix_last_hidden [G, H] and state (the `PrefixState`, reusable).
    """
    decoder = _check_model(model)
    config, device = model.config, _device(decoder)
    if isinstance(prefix_ids, PrefixState):
        v.check(prefix_lengths is None, "prefix_lengths: must be None when prefix_ids is a "
                "PrefixState (it carries its own lengths)")
        state = prefix_ids
        _check_state(state, config, device)
        lengths, prefix_stats = state.lengths, None
    else:
        _check_ids("prefix_ids", prefix_ids, device)
        lengths, prefix_stats = _lengths("prefix_lengths", prefix_lengths, prefix_ids,
                                         config.pad_token_id)
        state = None
    suffix_lengths, group_index, suffix_stats, group_values = _suffix_values(
        config, device, lengths, suffix_ids, group_index, suffix_lengths)
    prefix_stats, suffix_stats, group_values = _read(prefix_stats, suffix_stats, group_values)
    if state is None:
        longest = _check_lengths("prefix_lengths", prefix_stats, "prefix_ids", prefix_ids,
                                 config.pad_token_id)
        _check_total_length(config, longest, "prefix_lengths")
    _check_suffix(config, lengths.shape[0], suffix_ids, suffix_stats, group_values)
    if state is None:
        state = _prefix_pass(model, decoder, prefix_ids, lengths)
    hidden, _ = _suffix_pass(model, decoder, state, suffix_ids, group_index, suffix_lengths,
                             capture=False)
    return SharedPrefixOutput(hidden, state.last_hidden, state)


def _append(base: torch.Tensor, extra: torch.Tensor, base_lengths: torch.Tensor) -> torch.Tensor:
    # One copy per group: the extra tokens of group g go right after its real base tokens.
    groups, heads, width, dim = base.shape
    added = extra.shape[2]
    out = base.new_zeros(groups, heads, width + added, dim)  # zeros: the tail is never NaN
    out[:, :, :width] = base
    slots = base_lengths[:, None] + torch.arange(added, device=base.device)
    out.scatter_(2, slots[:, None, :, None].expand(groups, heads, added, dim), extra)
    return out


def extend_prefix(model: nn.Module, state: PrefixState, extra_ids: torch.Tensor,
                  extra_lengths: torch.Tensor | None = None,
                  detach_base: bool = True) -> PrefixState:
    """Append tokens to every prefix of a state: e.g. a teacher prompt made of the common head
    the student already computed and a teacher-only part (the privileged solution).

    The extra tokens attend to their group's base prefix and causally to each other; the new
    state holds, per layer and group, the base keys / values followed by the extra ones.

    Args:
        model: the model `state` was computed with (same weights).
        state: the base `PrefixState` ([G] groups).
        extra_ids: [G, E] token ids, right-padded, one row per group.
        extra_lengths: [G] integer in [1, E]; None means all E.
        detach_base: read the base keys / values detached (no gradient reaches the pass that
            computed them), as for a teacher that reuses the student's prefix.

    Returns:
        A new `PrefixState` with lengths state.lengths + extra_lengths and width P + E; its
        last_hidden is the hidden state of each group's last extra token.
    """
    decoder = _check_model(model)
    config, device = model.config, _device(decoder)
    _check_state(state, config, device)
    groups = state.num_groups
    _check_ids("extra_ids", extra_ids, device, rows=groups)
    lengths, stats = _lengths("extra_lengths", extra_lengths, extra_ids, config.pad_token_id)
    v.check(isinstance(detach_base, bool), f"detach_base: expected a bool, got {detach_base!r}")
    stats, (longest,) = _read(stats, (state.lengths + lengths).max())
    _check_lengths("extra_lengths", stats, "extra_ids", extra_ids, config.pad_token_id)
    _check_total_length(config, longest, "state.lengths + extra_lengths")
    base = state.detach() if detach_base else state
    group_index = torch.arange(groups, device=device)
    hidden, call = _suffix_pass(model, decoder, base, extra_ids, group_index, lengths,
                                capture=True)
    keys = [_append(b, e, base.lengths) for b, e in zip(base.keys, call.keys, strict=True)]
    values = [_append(b, e, base.lengths) for b, e in zip(base.values, call.values, strict=True)]
    return PrefixState(keys, values, base.lengths + lengths, _last(hidden, lengths), config)
