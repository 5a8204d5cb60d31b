"""Rollouts: responses sampled from the student. `RolloutEngine` is the seam where another
engine (vLLM, SGLang) plugs in; `HFGenerateEngine` uses transformers' `generate`, and
`InForwardEngine` runs an engine inside the forward of an FSDP2 root or a DeepSpeed ZeRO-3
engine."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from opsd_kernels import sharding


@dataclass(frozen=True)
class SamplingParams:
    num_samples: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses to token-id prompts from the current student weights.

    ``generate`` returns ``len(prompts) * params.num_samples`` responses, prompt-major (all
    samples of prompt 0 first), each a list of token ids without the prompt, ending with the
    eos token when the response finished within ``max_new_tokens``. An engine that holds its
    own copy of the weights (vLLM) must be synchronised by the caller after each optimizer step.
    """

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[list[int]]: ...


# generate's arguments the engine sets itself (from the prompts and SamplingParams).
_SET_BY_THE_ENGINE = frozenset({
    "input_ids", "attention_mask", "max_new_tokens", "num_return_sequences", "pad_token_id",
    "eos_token_id", "use_cache", "synced_gpus", "do_sample", "temperature", "top_p", "top_k",
    "suppress_tokens", "cache", "past_key_values"})


class HFGenerateEngine:
    """`model.generate` on left-padded prompt batches, with the KV cache, in eval mode.

    share_prompts: encode each prompt once and repeat its KV cache for its samples, instead of
    encoding it once per sample (the same tokens; fewer FLOPs when prompts are long).
    generate_kwargs: passed on to every ``generate`` call, e.g. ``{"cache_implementation":
    "static"}`` (on CUDA transformers then compiles the decoding step; on CPU neither helps,
    bench/results/*-rollouts.md)."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_id: int,
                 max_batch: int = 64, share_prompts: bool = False,
                 generate_kwargs: dict[str, Any] | None = None) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_batch = max_batch  # prompts per generate call (times num_samples rows)
        self.share_prompts = share_prompts
        owned = sorted(set(generate_kwargs or {}) & _SET_BY_THE_ENGINE)
        if owned:
            raise ValueError(f"generate_kwargs: {owned} are set by the engine (from the prompts "
                             "and SamplingParams); leave them out")
        self.generate_kwargs = dict(generate_kwargs or {})

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch):
            out.extend(self._generate(prompts[start:start + self.max_batch], params))
        return out

    def _generate(self, prompts: Sequence[Sequence[int]],
                  params: SamplingParams) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        sampling: dict[str, Any] = {"do_sample": False}
        copies, samples = params.num_samples, 1  # greedy: one answer per prompt, repeated
        if self.pad_token_id != self.eos_token_id:
            # A sampled pad token is noise, and a response starting with one reads as left
            # padding to the shared-prefix forward.
            sampling["suppress_tokens"] = [self.pad_token_id]
        if params.temperature > 0:
            copies, samples = 1, params.num_samples
            sampling |= {"do_sample": True, "temperature": params.temperature,
                         "top_p": params.top_p, "top_k": params.top_k}  # 0 = off
        ids, mask = ids.to(device), mask.to(device)
        # Sharded weights are gathered layer by layer in every process at once: each process
        # keeps stepping until all are done (transformers' synced_gpus), and skips the prefill,
        # whose use depends on its own prompts' width.
        synced = _shared_by_processes(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.share_prompts and samples > 1 and width > 1 and not synced:
                sampling[self._cache_name()] = self._prefill(ids, mask, samples)
                ids, mask = ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
                samples = 1
            generated = self.model.generate(
                input_ids=ids, attention_mask=mask,
                max_new_tokens=params.max_new_tokens, num_return_sequences=samples,
                pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, use_cache=True,
                synced_gpus=synced, **sampling, **self.generate_kwargs)
        finally:
            self.model.train(was_training)
        rows = [_until_eos(row, self.eos_token_id) for row in generated[:, width:].tolist()]
        return [row for row in rows for _ in range(copies)]


    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, samples: int) -> Any:
        """The KV cache of every prompt but its last token (which `generate` feeds to get the
        first logits), computed once and repeated for each sample."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: rows start at 0
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                         position_ids=positions[:, :-1], use_cache=True)
        cache = out[self._cache_name()]
        cache.batch_repeat_interleave(samples)
        return cache

    def _cache_name(self) -> str:
        """The KV cache's name in this transformers: `cache` from 5.2x on, `past_key_values`
        before (the old name still works there, with a deprecation warning)."""
        from opsd_kernels._peft import causal_lm  # PeftModel.forward only says **kwargs

        forward = inspect.signature(causal_lm(self.model).forward).parameters
        return "cache" if "cache" in forward else "past_key_values"


class InForwardEngine:
    """``engine``'s generate run as the forward of ``root``, an FSDP2 root module that contains
    the model (or, with ``inner``, as the forward of ``inner`` called by the wrapper ``root``: a
    DeepSpeed ZeRO-3 engine and the module it holds). The root gathers its own parameters there
    and the units inside it gather theirs as it expects (a unit whose forward runs first outside
    the root's would take itself for the root); under ZeRO-3 each module's hooks gather its
    partitions, and a weight read outside a module's forward is gathered as an external parameter
    of the running one. Every process takes part in each all-gather, so all run the same number
    of prompts: those with fewer add copies of a prompt and drop their responses."""

    def __init__(self, engine: RolloutEngine, root: nn.Module,
                 inner: nn.Module | None = None) -> None:
        self.engine = engine
        self.root = root
        self.inner = root if inner is None else inner

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[list[int]]:
        import torch.distributed as dist

        count = torch.tensor([len(prompts)], device=next(self.root.parameters()).device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        extra = int(count.item()) - len(prompts)
        if extra + len(prompts) == 0:
            return []
        filler = list(prompts[0]) if prompts else [0, 0]
        padded = [*prompts, *([filler] * extra)]
        out = sharding.run_as_forward(self.root, self.inner,
                                      lambda: self.engine.generate(padded, params))
        return out[: len(prompts) * params.num_samples]


def _shared_by_processes(model: nn.Module) -> bool:
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and sharding.is_sharded(model))


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
