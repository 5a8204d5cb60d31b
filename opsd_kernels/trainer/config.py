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

Method = Literal["opsd", "sft"]
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


@dataclass
class OPSDConfig:
    """One training run. Fields are grouped as in `opsd_kernels/trainer/configs/*.yaml`."""

    # model and tokenizer
    model: str = "tiny"  # a local Hugging Face model directory, or "tiny" (embedded, random)
    tokenizer: str | None = None  # defaults to `model`
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"  # auto: bf16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    gradient_checkpointing: bool = False  # always non-reentrant
    # LoRA (peft)
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])

    # method and teacher
    method: Method = "opsd"
    teacher_mode: TeacherMode = "current"  # current weights / initial policy / EMA of weights
    ema_decay: float = 0.99

    # data
    train_data: str | None = None  # .jsonl, .parquet, or a directory saved by datasets
    eval_data: str | None = None
    problem_column: str = "problem"
    solution_column: str = "solution"
    answer_column: str | None = "answer"  # optional; else the solution's last \boxed{}
    student_template: str = STUDENT_TEMPLATE
    teacher_template: str = TEACHER_TEMPLATE
    system_prompt: str | None = None
    chat_template: bool | None = None  # None: use the tokenizer's when it has one
    max_prompt_length: int = 1024  # teacher prompt tokens (problem + solution + transition)
    overlong: Overlong = "truncate"  # "truncate" shortens the solution; "skip" drops the row

    # rollouts
    num_rollouts: int = 4  # responses sampled per problem
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_top_k: int = 0  # 0: off
    max_new_tokens: int = 256

    # loss
    divergence: Literal["jsd", "forward_kl", "reverse_kl", "sampled"] = "jsd"
    beta: float = 0.5
    loss_temperature: float = 1.0
    loss_top_k: int | None = None
    clip: float | None = None
    shared_prefix: bool = True  # compute each prompt once per role (Llama/Qwen2/Qwen3/Mistral)
    # sft only: also train on the teacher prompts, for a model that cannot yet use a reference
    # solution in its context (a small model from scratch, as in the demo)
    sft_teacher_prompts: bool = False

    # optimisation
    problems_per_step: int = 4  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0

    # evaluation, logging, checkpoints
    eval_steps: int = 0  # 0: only at the end (when eval_data is set)
    eval_max_new_tokens: int | None = None  # defaults to max_new_tokens
    output_dir: str = "runs/opsd"
    logging_steps: int = 1
    save_steps: int = 0  # 0: only the final model
    resume: bool = True  # continue from the latest checkpoint in output_dir when there is one
    tensorboard: bool = False
    progress_bar: bool = True

    # --- loading and overriding ----------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> OPSDConfig:
        """Read a YAML mapping of field names to values, then apply ``overrides``."""
        import yaml

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
                    "logging_steps", "lora_rank")
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
        _require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must lie in [0, 1)")
        _require(self.teacher_mode != "fixed" or self.lora, "teacher_mode",
                 "'fixed' (the initial policy) is read by disabling the LoRA adapters; set "
                 "lora: true, or use 'ema' / 'current' for full fine-tuning")
        _require(self.divergence != "sampled" or self.loss_top_k is None, "loss_top_k",
                 "does not apply to divergence 'sampled'")
        for name in ("student_template", "teacher_template"):
            _require("{problem}" in getattr(self, name), name, "must contain {problem}")
        _require("{solution}" in self.teacher_template, "teacher_template",
                 "must contain {solution} (the privileged context)")
        _check_placeholders("student_template", self.student_template, {"problem"})
        _check_placeholders("teacher_template", self.teacher_template, {"problem", "solution"})


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config.{name}: {message}")


def _check_placeholders(name: str, template: str, allowed: set[str]) -> None:
    import string

    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"config.{name}: not a valid format string ({e}); write literal "
                         "braces as {{ and }}") from None
    extra = used - allowed
    _require(not extra, name, f"unknown placeholder(s) {sorted(extra)}; allowed: "
             f"{sorted(allowed)} (write literal braces as {{{{ and }}}})")


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


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``--key value`` pairs (values in YAML syntax: 3, 1e-5, true, null, [a, b]) as a dict;
    ``--key=value`` works too. Dashes in keys read as underscores."""
    import yaml

    out: dict[str, Any] = {}
    items = list(argv)
    while items:
        token = items.pop(0)
        if not token.startswith("--") or token == "--":
            raise ValueError(f"command line: expected --key value, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        if not eq:
            if not items or items[0].startswith("--"):
                raise ValueError(f"command line: --{key} needs a value")
            raw = items.pop(0)
        try:
            out[key.replace("-", "_")] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"command line: --{key}: cannot read {raw!r} ({e})") from None
    return out
