"""Loading the model and tokenizer a config names, checking them against the config, and
adding LoRA / gradient checkpointing."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from opsd_kernels.trainer.config import OPSDConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: OPSDConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config.device: {config.device!r}, but no CUDA device is available")
    return device


def resolve_dtype(config: OPSDConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


def load_model_and_tokenizer(config: OPSDConfig) -> tuple[nn.Module, Any]:
    """``config.model`` (see `model_sources`: the embedded tiny model, a preset, a GGUF file,
    a model directory or a hub id) in the config's dtype on its device."""
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    if config.model == "tiny":
        from opsd_kernels.trainer.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model(tokenizer, seed=config.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from opsd_kernels.trainer.model_sources import resolve

        source = resolve(config.model)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a local load
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve(config.tokenizer, field="tokenizer") if config.tokenizer else source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as err:  # a hub id offline; a directory missing files
            raise ValueError(f"model: {config.model!r} could not be loaded: "
                             f"{str(err).strip().splitlines()[0]}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=device, dtype=dtype), tokenizer


def check_model(model: nn.Module, config: OPSDConfig) -> None:
    """Fail before training on a model the config cannot run."""
    from opsd_kernels._peft import causal_lm
    from opsd_kernels.prefix import check_prefix_model

    lm = causal_lm(model)
    model_config = lm.config
    if lm.get_output_embeddings() is None:
        raise ValueError("model: no output embeddings (lm_head); pass a *ForCausalLM")
    longest = config.max_prompt_length + config.max_new_tokens
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ValueError(f"config.max_prompt_length + max_new_tokens = {longest} exceeds the "
                         f"model's max_position_embeddings {limit}; lower max_prompt_length "
                         f"(now {config.max_prompt_length}) or max_new_tokens (now "
                         f"{config.max_new_tokens})")
    if config.shared_prefix:
        try:
            check_prefix_model(lm, longest)
        except (NotImplementedError, ValueError) as err:
            raise ValueError(f"config.shared_prefix: {err}; set shared_prefix: false") from err
    if config.lora:
        if "lm_head" in config.lora_target_modules:
            raise ValueError("config.lora_target_modules: 'lm_head' cannot take LoRA here; the "
                             "fused loss reads lm_head.weight directly")
        if not hasattr(model, "peft_config"):
            try:
                import peft  # noqa: F401
            except ImportError as e:
                raise ValueError("config.lora: true needs peft (pip install peft)") from e


def prepare_model(model: nn.Module, config: OPSDConfig) -> nn.Module:
    """LoRA adapters (unless ``model`` already has them) and non-reentrant checkpointing."""
    if config.lora and not hasattr(model, "peft_config"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model: no trainable parameters")
    return model
