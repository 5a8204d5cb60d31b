"""The fused loss inside TRL's distillation trainers (GKD and SDFT).

    from opsd_kernels.integrations.trl import FusedGKDTrainer  # or FusedSDFTTrainer
    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)
    trainer.train()

Each class is TRL's trainer with `compute_loss` replaced: student and teacher run to their final
hidden states (the backbone under the lm_head) and `fused_linear_divergence` forms the loss from
them and the heads' weights, a chunk of tokens at a time, so neither role's [tokens x vocab]
logits exist. Everything else (data, generation, teacher handling, logging) is TRL's. The value
and the gradients are those of TRL's own compute_loss: same masks, shift by one, beta,
temperature, reductions and gradient-accumulation scaling.

The logic lives in the mixins `FusedGKDMixin` / `FusedSDFTMixin`, which import neither TRL nor
transformers; put one before a (subclass of a) TRL trainer in the bases. The ready-made classes
are built on first access, which is when TRL gets imported: `import opsd_kernels` and
`import opsd_kernels.integrations` stay free of it.

Sharded models: the student's loss runs as the forward of what the trainer holds (the FSDP2 root,
the DeepSpeed engine), and `opsd_kernels.sharding` gives it the heads' weights whole: under FSDP2
the head's unit gathers it, under ZeRO-3 the engine's forward does (and gathers it again for the
backward); the student's gradient goes back through FSDP's reduce-scatter or ZeRO's partitioned
gradients, and a separate teacher's head is gathered as a copy. FSDP2, ZeRO-2 and ZeRO-3 are
tested with 2 CPU processes (configs in opsd_kernels/trainer/configs/); FSDP1 is refused (its
flat parameters hide the head's weight).

Not covered: PEFT adapters on the lm_head or prompt-learning adapters (their effect lives outside
the backbone and the head's weight), models that rescale their logits (`logit_scale`,
`logits_scaling`), and SDFT's `use_teacher_server` (the teacher's log-probs then come from a vLLM
server, with no hidden states to fuse). Each is refused with a ValueError.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import torch
from torch import nn

from opsd_kernels import sharding
from opsd_kernels._guards import zeros_on_graph
from opsd_kernels._peft import causal_lm
from opsd_kernels.losses import fused_linear_divergence
from opsd_kernels.types import BACKENDS, Backend

__all__ = ["FusedGKDMixin", "FusedGKDTrainer", "FusedSDFTMixin", "FusedSDFTTrainer"]

# Config attributes of models whose logits are lm_head(h) rescaled (Cohere multiplies by
# logit_scale, Granite divides by logits_scaling): the fused loss would miss the factor.
_LOGIT_SCALES = ("logit_scale", "logits_scaling")


class _Role(NamedTuple):
    """What the fused loss needs of one model: where to run it, its backbone and its head."""

    wrapper: nn.Module  # what the trainer holds (DDP / DeepSpeed engine / the model itself)
    inner: nn.Module  # the module the wrapper calls (PeftModel or the causal LM)
    backbone: nn.Module  # the causal LM without its head: gives the final hidden states
    head: nn.Linear
    softcap: float | None


def _fail(message: str) -> NoReturn:
    raise ValueError(message)


def _resolve(model: nn.Module, accelerator: Any, what: str) -> _Role:
    """Find the backbone and lm_head of a causal LM behind accelerate and PEFT wrappers."""
    inner = accelerator.unwrap_model(model) if accelerator is not None else model
    lm = inner
    peft_config = getattr(inner, "peft_config", None)
    if peft_config is not None and hasattr(inner, "get_base_model"):  # a peft.PeftModel
        # Prompt-learning adapters prepend virtual tokens inside PeftModel.forward, which the
        # backbone call skips: the loss would be computed on the wrong sequence.
        if any(getattr(cfg, "is_prompt_learning", False) for cfg in peft_config.values()):
            _fail(f"{what}: prompt-learning PEFT adapters (prompt / prefix / p-tuning) are not "
                  "supported: the fused loss runs the backbone directly, bypassing the virtual "
                  "tokens PeftModel.forward adds; use a weight adapter such as LoRA")
        lm = causal_lm(inner)
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        _fail(f"{what}: the fused loss reads the weight of an nn.Linear lm_head, but "
              f"{type(lm).__name__}'s output embeddings are {type(head).__name__} (an adapter on "
              "the lm_head would be skipped and never trained: remove 'lm_head' from the "
              "adapter's target_modules)")
    backbone = getattr(lm, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is lm:
        get_decoder = getattr(lm, "get_decoder", None)
        backbone = get_decoder() if callable(get_decoder) else None
    if not isinstance(backbone, nn.Module) or backbone is lm:
        _fail(f"{what}: cannot find the backbone of {type(lm).__name__} (its `base_model` / "
              "`get_decoder()` must be the model without its lm_head)")
    config = getattr(lm, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_SCALES:
        scale = getattr(text_config, name, None)
        if scale is not None and scale != 1:
            _fail(f"{what}: the model rescales its logits (config.{name}={scale}), which the "
                  "fused loss does not apply; not supported")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return _Role(model, inner, backbone, head, float(softcap) if softcap else None)


def _mixed_precision(accelerator: Any) -> contextlib.AbstractContextManager:
    """The autocast accelerate wraps a prepared model's forward in (mixed precision)."""
    if not getattr(accelerator, "native_amp", False):
        return contextlib.nullcontext()
    return accelerator.autocast()


def _final_hidden(role: _Role, accelerator: Any, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden states, in the head's dtype.

    Calling the backbone skips the autocast accelerate puts on the model's forward, so it is
    entered here; the loss itself runs outside it, in the head's dtype with fp32 accumulation
    (its logits are never rounded to bf16, unlike an autocast lm_head GEMM).
    """
    if input_ids.shape[0] == 0:  # a batch without rows: transformers' attention cannot run it
        params = [p for p in role.backbone.parameters() if p.requires_grad]
        hidden = zeros_on_graph((0, input_ids.shape[1], role.head.in_features),
                                input_ids.device, *params)
        return hidden.to(role.head.weight.dtype)
    with _mixed_precision(accelerator):
        out = role.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.to(role.head.weight.dtype)


def _check_heads(student: _Role, teacher: _Role, what: str) -> None:
    if student.softcap != teacher.softcap:
        _fail(f"{what}: student and teacher soft-cap their logits differently "
              f"({student.softcap} vs {teacher.softcap}); the fused loss applies one cap")


@contextlib.contextmanager
def _head_args(student: _Role, teacher: _Role) -> Iterator[dict[str, Any]]:
    """The head arguments of fused_linear_divergence for a student / teacher pair, whole for the
    block (gathered from their shards under FSDP2; see `opsd_kernels.sharding`). Enter it inside
    the student's forward: the student's gradient then goes back through its wrapper."""
    shared = teacher.head.weight is student.head.weight
    with contextlib.ExitStack() as stack:

        def student_param(name: str) -> torch.Tensor | None:
            if getattr(student.head, name) is None:
                return None
            return stack.enter_context(sharding.full_weight(student.inner, student.head, name))

        def teacher_copy(name: str) -> torch.Tensor | None:
            if getattr(teacher.head, name) is None:
                return None
            return sharding.full_copy(teacher.inner, teacher.head, name)

        yield {
            "weight": student_param("weight"),
            # One GEMM gives both roles' logits when the head is shared (live or base-adapter
            # teacher); a separate head is a fixed target, so it is detached.
            "teacher_weight": None if shared else teacher_copy("weight"),
            "student_bias": student_param("bias"),
            "teacher_bias": teacher_copy("bias"),
            "logit_softcap": student.softcap,
        }


def _batch(inputs: Mapping[str, Any], keys: tuple[str, ...], what: str) -> list[torch.Tensor]:
    if not isinstance(inputs, Mapping):
        _fail(f"{what}: inputs must be a mapping of tensors, got {type(inputs).__name__}")
    missing = [k for k in keys if k not in inputs]
    if missing:
        _fail(f"{what}: inputs lack {missing} (have {sorted(inputs)})")
    values = [inputs[k] for k in keys]
    for key, value in zip(keys, values, strict=True):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            _fail(f"{what}: inputs[{key!r}] must be a [batch, length] tensor, got {shape}")
    return values


def _check_kernel_options(backend: str, chunk_size: int | None) -> None:
    if backend not in BACKENDS:
        _fail(f"fused_backend: expected one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        _fail(f"fused_chunk_size: must be a positive integer, got {chunk_size!r}")


def _check_sharding(trainer: Any, what: str) -> None:
    # FSDP2's DTensor shards and ZeRO-3's partitions are gathered by opsd_kernels.sharding; FSDP1
    # flattens each unit's parameters into one buffer, where the head's weight cannot be found.
    plugin = getattr(getattr(trainer.accelerator, "state", None), "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and getattr(plugin, "fsdp_version", 1) != 2:
        _fail(f"{what}: FSDP1 is not supported (the fused loss reads the lm_head weight, which "
              "FSDP1 flattens into its units' buffers); use FSDP2 (fsdp_version: 2)")


class FusedGKDMixin:
    """`compute_loss` of TRL's `GKDTrainer` on the fused loss; use before GKDTrainer in the bases.

    TRL's loss is `generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1],
    labels[:, 1:], beta=args.beta, num_items_in_batch=...)`: generalized JSD at temperature 1
    (`args.temperature` only shapes on-policy sampling), the sum over tokens whose label is not
    -100, divided by their count or by `num_items_in_batch`. This mixin computes the same from the
    hidden states.

    Args (keyword-only, besides those of the trainer):
        loss_temperature: also divide both roles' logits by this inside the loss, as
            `generalized_jsd_loss(..., temperature=)` would; None (the default) keeps TRL's
            temperature-1 loss.
        fused_backend: backend of `fused_linear_divergence` ("auto", "triton", "native", "torch").
        fused_chunk_size: rows per chunk; None sizes chunks from a fixed workspace budget.
    """

    def __init__(self, *args: Any, loss_temperature: float | None = None,
                 fused_backend: Backend = "auto", fused_chunk_size: int | None = None,
                 **kwargs: Any) -> None:
        if loss_temperature is not None and not (
                isinstance(loss_temperature, (int, float)) and math.isfinite(loss_temperature)
                and loss_temperature > 0):
            _fail(f"loss_temperature: must be a finite number > 0 or None, got "
                  f"{loss_temperature!r}")
        _check_kernel_options(fused_backend, fused_chunk_size)
        super().__init__(*args, **kwargs)
        _check_sharding(self, type(self).__name__)
        self.loss_temperature = loss_temperature
        self.fused_backend = fused_backend
        self.fused_chunk_size = fused_chunk_size

    def compute_loss(self, model: nn.Module, inputs: Mapping[str, Any],
                     return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None) -> Any:
        """The GKD loss of a batch (input_ids, attention_mask, labels with -100 on prompt and
        padding tokens); with return_outputs, also the student's outputs (from an extra forward
        without gradients: the fused loss forms no logits)."""
        what = type(self).__name__
        input_ids, attention_mask, labels = _batch(
            inputs, ("input_ids", "attention_mask", "labels"), what)
        student = _resolve(model, self.accelerator, f"{what} (student)")
        teacher = _resolve(self.teacher_model, self.accelerator, f"{what} (teacher)")
        _check_heads(student, teacher, what)
        tau = 1.0 if self.loss_temperature is None else float(self.loss_temperature)

        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = sharding.run_as_forward(
                teacher.wrapper, teacher.inner,
                lambda: _final_hidden(teacher, self.accelerator, input_ids, attention_mask))

        def student_loss() -> torch.Tensor:
            hidden = _final_hidden(student, self.accelerator, input_ids, attention_mask)
            # Position i predicts token i + 1; labels are -100 on prompt and padding tokens, so
            # the shifted labels carry the mask.
            with _head_args(student, teacher) as heads:
                return fused_linear_divergence(
                    hidden[:, :-1], heads.pop("weight"), teacher_hidden[:, :-1], **heads,
                    labels=labels[:, 1:], divergence="jsd", beta=float(self.beta),
                    temperature=tau, reduction="mean", num_items=num_items_in_batch,
                    backend=self.fused_backend, chunk_size=self.fused_chunk_size)

        loss = sharding.run_as_forward(student.wrapper, student.inner, student_loss)
        if not return_outputs:
            return loss
        # Evaluation asks for the logits (compute_metrics); the fused loss never forms them, so
        # they come from one more forward without gradients, as in TRL's SFTTrainer.
        with torch.no_grad():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        return loss, outputs


def _check_sdft_config(config: Any, what: str) -> None:
    """Refuse the SDFT options the fused loss cannot express."""
    if getattr(config, "use_teacher_server", False):
        _fail(f"{what}: use_teacher_server=True is not supported: the teacher's log-probs then "
              "come from the vLLM server, so there are no teacher hidden states to fuse; use a "
              "local teacher (use_teacher_server=False) or TRL's SDFTTrainer")
    mode = getattr(config, "distillation_mode", None)
    if mode not in ("topk_logits", "full_logits", "sampled_token"):
        _fail(f"{what}: distillation_mode must be one of 'sampled_token', 'full_logits', "
              f"'topk_logits', got {mode!r}")
    if mode == "topk_logits" and config.distillation_topk is None:
        _fail(f"{what}: distillation_mode='topk_logits' requires distillation_topk to be set")
    if mode == "sampled_token" and config.distillation_alpha != 1.0:
        _fail(f"{what}: distillation_mode='sampled_token' only supports reverse KL "
              f"(distillation_alpha=1.0), got {config.distillation_alpha}")


class FusedSDFTMixin:
    """`compute_loss` of TRL's `SDFTTrainer` on the fused loss; use before SDFTTrainer in the bases.

    The options of SDFTConfig map as follows: `distillation_mode` "full_logits" -> divergence
    "jsd", "topk_logits" -> "jsd" with `top_k=distillation_topk, top_k_source="student",
    tail_bucket=distillation_add_tail`, "sampled_token" -> "sampled";
    `distillation_alpha` -> beta; `temperature` divides both roles' logits;
    `num_loss_tokens_to_skip` masks the first completion tokens; the per-sequence mean, then the
    mean over the batch, divided by the gradient-accumulation steps in training. With
    `distillation_is_clip` and rollout log-probs in the batch, each token's loss is multiplied by
    the clipped importance ratio, computed from the student's label log-probabilities that the
    same fused pass returns. `use_teacher_server=True` is refused (ValueError).

    Args (keyword-only, besides those of the trainer):
        fused_backend: backend of `fused_linear_divergence` ("auto", "triton", "native", "torch").
        fused_chunk_size: rows per chunk; None sizes chunks from a fixed workspace budget.
    """

    def __init__(self, *args: Any, fused_backend: Backend = "auto",
                 fused_chunk_size: int | None = None, **kwargs: Any) -> None:
        _check_kernel_options(fused_backend, fused_chunk_size)
        # Refuse before TRL's constructor starts servers or loads a teacher.
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is not None:
            _check_sdft_config(config, type(self).__name__)
        super().__init__(*args, **kwargs)
        _check_sdft_config(self.args, type(self).__name__)
        _check_sharding(self, type(self).__name__)
        self.fused_backend = fused_backend
        self.fused_chunk_size = fused_chunk_size

    def _fused_options(self) -> dict[str, Any]:
        mode = self.args.distillation_mode
        if mode == "sampled_token":
            return {"divergence": "sampled"}
        options: dict[str, Any] = {"divergence": "jsd", "beta": float(self.args.distillation_alpha)}
        if mode == "topk_logits":
            options.update(top_k=int(self.args.distillation_topk), top_k_source="student",
                           tail_bucket=bool(self.args.distillation_add_tail))
        return options

    def compute_loss(self, model: nn.Module, inputs: Mapping[str, Any],
                     return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """The SDFT loss of a batch from `_prepare_inputs` (prompt_ids / prompt_mask left-padded,
        completion_ids / completion_mask right-padded, teacher_input_ids /
        teacher_attention_mask, optionally old_per_token_logps)."""
        what = type(self).__name__
        if return_outputs:
            _fail(f"{what}: compute_loss does not return outputs (nor does TRL's SDFTTrainer)")
        _check_sdft_config(self.args, what)
        prompt_ids, prompt_mask, completion_ids, completion_mask, t_ids, t_mask = _batch(
            inputs, ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                     "teacher_input_ids", "teacher_attention_mask"), what)
        width = completion_ids.size(1)
        student = _resolve(model, self.accelerator, f"{what} (student)")
        teacher = _resolve(self.teacher_model, self.accelerator, f"{what} (teacher)")
        _check_heads(student, teacher, what)

        loss_mask = completion_mask
        skip = self.num_loss_tokens_to_skip
        if skip > 0:  # SDFT drops the first completion tokens (teacher-prompt artifacts)
            positions = torch.arange(width, device=completion_mask.device).unsqueeze(0)
            loss_mask = completion_mask * (positions >= skip).long()
        labels = completion_ids.masked_fill(loss_mask == 0, -100)
        options = self._fused_options()
        old_logps = inputs.get("old_per_token_logps")
        clip = self.args.distillation_is_clip
        importance = clip is not None and old_logps is not None
        # TRL divides by the accumulation steps of the current step (set by the training loop).
        steps = getattr(self, "current_gradient_accumulation_steps",
                        self.args.gradient_accumulation_steps)
        scale = steps if self.model.training else 1.0

        # The teacher context disables the student's adapter (base teacher) or selects the EMA
        # adapter, as in TRL; for a separate teacher model it does nothing.
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            teacher_hidden = sharding.run_as_forward(
                teacher.wrapper, teacher.inner,
                lambda: _final_hidden(teacher, self.accelerator, t_ids, t_mask))
        teacher_hidden = teacher_hidden[:, :-1][:, -width:]

        def student_loss() -> tuple[torch.Tensor, torch.Tensor]:
            hidden = _final_hidden(student, self.accelerator,
                                   torch.cat([prompt_ids, completion_ids], dim=1),
                                   torch.cat([prompt_mask, completion_mask], dim=1))
            # Completion token j is predicted at position P + j - 1 (P the prompt width).
            hidden = hidden[:, :-1][:, -width:]
            with _head_args(student, teacher) as heads:
                weight = heads.pop("weight")
                common = dict(labels=labels, temperature=float(self.temperature), **options,
                              **heads, return_stats=True, backend=self.fused_backend,
                              chunk_size=self.fused_chunk_size)
                if not importance:
                    # Mean over each sequence's loss tokens, then over all B sequences (empty
                    # ones count as 0, as in TRL): sequence_mean with num_items = B (times the
                    # accumulation steps TRL divides by).
                    loss, stats = fused_linear_divergence(
                        hidden, weight, teacher_hidden, reduction="sequence_mean",
                        num_items=completion_ids.size(0) * scale, **common)
                    return loss, stats.divergence
                # The importance ratio depends on the current student's log p(y), which only
                # this pass computes: take per-token losses and reduce here.
                per_token, stats = fused_linear_divergence(
                    hidden, weight, teacher_hidden, reduction="none", **common)
            log_ratio = (stats.student_logprob - old_logps.to(stats.student_logprob)).detach()
            ratio = torch.exp(log_ratio.clamp(min=-20.0, max=20.0)).clamp(max=clip)
            per_token = per_token * ratio
            mask = loss_mask.to(per_token.dtype)
            # The mean over sequences, written so that a batch without any is 0, not NaN.
            per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            loss = per_sequence.sum() / max(per_sequence.numel(), 1)
            return loss / scale, per_token.detach()

        loss, per_token = sharding.run_as_forward(student.wrapper, student.inner, student_loss)
        # TRL's metric: the token mean of the (importance-weighted) per-token loss.
        mask = loss_mask.to(per_token.dtype)
        mean_loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        mode = "train" if model.training else "eval"
        self._log_self_distillation_metric(mode, self.accelerator.gather(mean_loss).mean().item())
        return loss


# name -> (TRL module, TRL class, mixin). The classes are built on first access.
_TRAINERS: dict[str, tuple[str, str, type]] = {
    "FusedGKDTrainer": ("trl.experimental.gkd", "GKDTrainer", FusedGKDMixin),
    "FusedSDFTTrainer": ("trl.experimental.sdft", "SDFTTrainer", FusedSDFTMixin),
}

if TYPE_CHECKING:
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.sdft import SDFTTrainer

    class FusedGKDTrainer(FusedGKDMixin, GKDTrainer): ...

    class FusedSDFTTrainer(FusedSDFTMixin, SDFTTrainer): ...


def __getattr__(name: str) -> type:
    if name not in _TRAINERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, base_name, mixin = _TRAINERS[name]
    try:
        base = getattr(importlib.import_module(module_name), base_name)
    except ImportError as err:
        raise ImportError(f"{name} needs TRL ({module_name}.{base_name}): pip install trl") from err
    doc = f"TRL's `{base_name}` with the fused loss of `{mixin.__name__}`.\n\n{mixin.__doc__}"
    cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                     "__doc__": doc})
    globals()[name] = cls  # later look-ups skip this function
    return cls
