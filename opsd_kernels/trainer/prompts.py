"""Student and teacher prompts as token ids.

The student sees the problem; the teacher sees problem + reference solution + a transition
sentence. Both are rendered from the config's templates, wrapped in the tokenizer's chat
template (a single user turn, with the generation prompt) when it has one, and tokenised whole;
the tokens the two prompts share at the start (the "head") are found on the ids themselves, so
the shared-prefix forward can compute them once, whatever the tokenizer merges at boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opsd_kernels.trainer.config import OPSDConfig
from opsd_kernels.trainer.data import Problem

_SLOT = "\u2063opsd-user-turn\u2063"  # stands in for the user text when splitting the template


@dataclass(frozen=True)
class EncodedProblem:
    student: list[int]  # student prompt ids
    teacher: list[int]  # teacher prompt ids
    target: list[int]  # reference solution + eos: the supervised baseline's response
    answer: str | None
    truncated: bool  # the solution in the teacher prompt was cut (max_prompt_length)
    target_truncated: bool = False  # the target was cut (max_new_tokens)

    @property
    def head_length(self) -> int:
        """Tokens the two prompts share at the start, leaving each at least one of its own."""
        limit = min(len(self.student), len(self.teacher)) - 1
        n = 0
        while n < limit and self.student[n] == self.teacher[n]:
            n += 1
        return n


@dataclass
class EncodingReport:
    total: int = 0
    truncated: int = 0  # the teacher prompt's solution cut to fit max_prompt_length
    target_truncated: int = 0  # the sft target (solution + eos) cut to max_new_tokens
    skipped: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.total} problems: {self.total - len(self.skipped)} kept"]
        if self.truncated:
            parts.append(f"{self.truncated} with the reference solution truncated in the "
                         "teacher prompt (max_prompt_length)")
        if self.target_truncated:
            parts.append(f"{self.target_truncated} with the supervised target truncated "
                         "(max_new_tokens; used by method sft)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped as longer than max_prompt_length")
        return ", ".join(parts)


class PromptEncoder:
    def __init__(self, tokenizer: Any, config: OPSDConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        use_chat = config.chat_template
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if use_chat and not has_template:
            raise ValueError("config.chat_template: true, but the tokenizer has no chat "
                             "template; set it to null or false")
        self.chat = has_template if use_chat is None else use_chat
        self.before, self.after = self._chat_wrapping() if self.chat else ("", "")
        if not self.chat and config.system_prompt:
            self.before = config.system_prompt + "\n\n"
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: no eos_token_id; responses need an end token")

    def _chat_wrapping(self) -> tuple[str, str]:
        messages = [{"role": "user", "content": _SLOT}]
        if self.config.system_prompt:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        before, slot, after = text.partition(_SLOT)
        if not slot:
            raise ValueError("tokenizer: its chat template drops the user message")
        return before, after

    def _ids(self, user_text: str) -> list[int]:
        text = self.before + user_text + self.after
        # A chat template writes its own special tokens; plain text gets the tokenizer's (BOS).
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def student_prompt(self, problem: str) -> list[int]:
        return self._ids(self.config.student_template.format(problem=problem))

    def teacher_prompt(self, problem: str, solution: str, answer: str | None = None,
                       ) -> list[int]:
        return self._ids(self.config.teacher_template.format(problem=problem, solution=solution,
                                                             answer=answer))

    def encode(self, item: Problem) -> EncodedProblem | None:
        """The problem's prompts, or None when even the shortest form is too long."""
        limit = self.config.max_prompt_length
        if item.answer is None and "{answer}" in self.config.teacher_template:
            raise ValueError(f"data: problem {item.problem[:60]!r} has no final answer, but "
                             "config.teacher_template shows {answer}")
        student = self.student_prompt(item.problem)
        teacher = self.teacher_prompt(item.problem, item.solution, item.answer)
        solution_ids = self.tokenizer(item.solution, add_special_tokens=False)["input_ids"]
        truncated = False
        if len(student) > limit:
            return None
        if len(teacher) > limit:
            if self.config.overlong == "skip":
                return None
            # Cut the solution by the excess; re-encoding a decoded cut can merge differently,
            # so a few rounds settle it.
            keep = len(solution_ids)
            for _ in range(4):
                keep -= len(teacher) - limit
                if keep <= 0:
                    return None
                cut = self.tokenizer.decode(solution_ids[:keep])
                teacher = self.teacher_prompt(item.problem, cut, item.answer)
                if len(teacher) <= limit:
                    break
            else:
                return None
            truncated = True
        target = solution_ids[: self.config.max_new_tokens - 1] + [self.tokenizer.eos_token_id]
        target_truncated = len(solution_ids) > self.config.max_new_tokens - 1
        return EncodedProblem(student, teacher, target, item.answer, truncated, target_truncated)

    def encode_all(self, items: list[Problem]) -> tuple[list[EncodedProblem], EncodingReport]:
        report = EncodingReport(total=len(items))
        out = []
        for i, item in enumerate(items):
            encoded = self.encode(item)
            if encoded is None:
                report.skipped.append(i)
                continue
            report.truncated += encoded.truncated
            if self.config.method == "sft":  # opsd samples its responses: no target to cut
                report.target_truncated += encoded.target_truncated
            out.append(encoded)
        if not out:
            raise ValueError(f"data: every problem is longer than max_prompt_length "
                             f"({self.config.max_prompt_length} tokens); raise it")
        return out, report
