"""Final answers: the last ``\\boxed{...}`` of a text, graded with math-verify when it is
installed and by normalised exact match otherwise; on request (``unboxed=True``), a text with no
box at all is graded on its last number. Logged only; never part of the loss."""

from __future__ import annotations

import functools
import re
from typing import Any

_BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
    return None  # unclosed: a truncated response has no answer


def _normalise(answer: str) -> str:
    answer = re.sub(r"\s+", "", answer).rstrip(".").replace("\\!", "")
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)  # 1,776 -> 1776


@functools.cache
def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (sign, thousands separators and decimals kept)."""
    found = _NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


def is_correct(response: str, reference: str | None, *, unboxed: bool = False) -> bool:
    """Whether the response's final boxed answer equals ``reference``. With ``unboxed``, a
    response without any ``\\boxed{}`` is graded on its last number instead (for models that
    answer in plain text; a response with a box is always graded on its last box)."""
    predicted = last_boxed(response)
    if predicted is None and unboxed and _BOXED not in response:
        predicted = last_number(response)
    if predicted is None or reference is None:
        return False
    if _normalise(predicted) == _normalise(reference):
        return True
    mv = _math_verify()
    if mv is None:
        return False
    try:
        return bool(mv.verify(mv.parse(f"${reference}$"), mv.parse(f"${predicted}$")))
    except Exception:  # math-verify raises on unparsable text (and times out on some)
        return False


def correct_flags(tokenizer: Any, responses: list[list[int]], answers: list[str | None], *,
                  unboxed: bool = False) -> list[float]:
    """1.0 for each decoded response whose final answer matches, else 0.0 (see `is_correct`)."""
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [float(is_correct(t, a, unboxed=unboxed))
            for t, a in zip(texts, answers, strict=True)]


def count_correct(tokenizer: Any, responses: list[list[int]], answers: list[str | None], *,
                  unboxed: bool = False) -> int:
    """How many decoded responses end in the matching final answer."""
    return int(sum(correct_flags(tokenizer, responses, answers, unboxed=unboxed)))


def group_advantages(rewards: list[float], group_size: int) -> list[float]:
    """GRPO's advantages: each reward minus its group's mean, over the group's standard
    deviation (unbiased, + 1e-4 so a group of equal rewards gets zeros), as TRL's
    ``scale_rewards="group"``. Groups are consecutive runs of ``group_size``."""
    if group_size < 2 or len(rewards) % group_size:
        raise ValueError(f"group_advantages: {len(rewards)} rewards do not form groups of "
                         f"{group_size} (>= 2)")
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / group_size
        std = (sum((r - mean) ** 2 for r in group) / (group_size - 1)) ** 0.5
        out += [(r - mean) / (std + 1e-4) for r in group]
    return out
