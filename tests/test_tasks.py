"""Task families: deterministic per seed, disjoint splits, reference solutions whose boxed
answer is the true value, and grading of tricky responses."""

from __future__ import annotations

import re

import pytest

from opsd_kernels.trainer import tasks
from opsd_kernels.trainer.answers import is_correct, last_boxed

TASKS = [f"{name}:{d}" for name, fam in tasks.FAMILIES.items() for d in fam.difficulties]


def _true_value(problem: str) -> int:
    """The answer computed from the problem text alone (not from the solution)."""
    match = re.fullmatch(r"What is (\d+) ([-+x]) (\d+)\?", problem)
    if match:
        a, op, b = int(match[1]), match[2], int(match[3])
        return {"+": a + b, "-": a - b, "x": a * b}[op]
    count = int(re.match(r"\w+ has (\d+)", problem)[1])
    for boxes, each, gone, found in re.findall(
            r"buys (\d+) boxes with (\d+)|gives (\d+)|finds (\d+)", problem):
        count += int(boxes) * int(each) if boxes else -int(gone) if gone else int(found)
    return count


@pytest.mark.parametrize("task", TASKS)
def test_reference_solutions_box_the_true_answer(task: str) -> None:
    for split in tasks.SPLITS:
        for row in tasks.generate(task, 10, split=split, seed=3):
            assert row["answer"] == str(_true_value(row["problem"]))
            assert last_boxed(row["solution"]) == row["answer"]
            assert is_correct(row["solution"], row["answer"])
            assert tasks.split_of(row["problem"]) == split


@pytest.mark.parametrize("task", ["addition:2", "word_problems:2", "multiplication:3"])
def test_deterministic_per_seed_and_splits_disjoint(task: str) -> None:
    first = tasks.generate(task, 40, split="train", seed=7)
    assert first == tasks.generate(task, 40, split="train", seed=7)
    assert first != tasks.generate(task, 40, split="train", seed=8)
    held_out = {r["problem"] for seed in range(3)
                for r in tasks.generate(task, 20, split="eval", seed=seed)}
    trained = {r["problem"] for seed in range(3)
               for r in tasks.generate(task, 40, split="train", seed=seed)}
    assert held_out and not held_out & trained
    assert len({r["problem"] for r in first}) == 40


def test_subtraction_reaches_negative_answers() -> None:
    answers = [int(r["answer"]) for r in tasks.generate("subtraction:2", 60, seed=0)]
    assert min(answers) < 0 < max(answers)


def test_a_family_too_small_for_the_request_says_so() -> None:
    with pytest.raises(ValueError, match="only .* distinct eval problems"):
        tasks.generate("addition:1", 60, split="eval")


@pytest.mark.parametrize("task, message", [
    ("division", "unknown family 'division'"),
    ("addition:9", "difficulty must be one of 1, 2, 3, 4"),
    ("addition:x", "difficulty must be one of"),
])
def test_bad_task_names(task: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tasks.generate(task, 1)


def test_bad_split_and_count() -> None:
    with pytest.raises(ValueError, match="split"):
        tasks.generate("addition", 1, split="test")
    with pytest.raises(ValueError, match="n: -1"):
        tasks.generate("addition", -1)


@pytest.mark.parametrize("response, reference, correct", [
    ("so \\boxed{-12}", "-12", True),
    ("so \\boxed{- 12}", "-12", True),
    ("so \\boxed{12}", "-12", False),
    ("first \\boxed{7}, no wait: \\boxed{8}", "8", True),   # the last box counts
    ("first \\boxed{8}, no wait: \\boxed{7}", "8", False),
    ("the answer is 8", "8", False),                        # no box, no answer
    ("\\boxed{1,776}", "1776", True),                       # thousands separator
    ("\\boxed{1776.}", "1776", True),
    ("\\boxed{17 76}", "1776", True),                       # spaces inside a number
    ("\\boxed{\\frac{1}{2}}", "0.5", True),                 # math-verify's equivalence
    ("\\boxed{12", "12", False),                            # unclosed: truncated response
])
def test_grading_tricky_answers(response: str, reference: str, correct: bool) -> None:
    assert is_correct(response, reference) is correct


@pytest.mark.parametrize("response, reference, correct", [
    ("81 - 70 = 11", "11", True),                           # the last number
    ("69 - 31 = 22.", "38", False),
    ("so the result is -12.", "-12", True),
    ("1,776 apples", "1776", True),
    ("first 11, then \\boxed{12}", "11", False),            # a box always wins
    ("\\boxed{11", "11", False),                            # a truncated box is no answer
    ("no number here", "11", False),
])
def test_unboxed_fallback_grades_the_last_number(response: str, reference: str,
                                                 correct: bool) -> None:
    assert is_correct(response, reference, unboxed=True) is correct
    if "\\boxed" not in response:
        assert not is_correct(response, reference)  # off by default
