"""The one place that looks behind a peft wrapper for the transformers model it adapts."""

from __future__ import annotations

from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft model (its LoRA layers are injected into it,
    so they still apply), or ``model`` itself. Needs neither peft nor transformers."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model
