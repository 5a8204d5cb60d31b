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


def count_correct(tokenizer: Any, responses: list[list[int]], answers: list[str | None]) -> int:
    """How many decoded responses end in the matching boxed answer."""
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return sum(is_correct(t, a) for t, a in zip(texts, answers, strict=True))
