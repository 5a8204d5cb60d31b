"""Problem families built in code, with worked reference solutions and held-out splits.

A task is named `family` or `family:difficulty` (e.g. `addition:2`, `word_problems:1`):

| family | difficulty d | problem |
|---|---|---|
| addition | 1..4 | two d-digit numbers added |
| subtraction | 1..4 | two numbers of up to d digits subtracted (negative results allowed) |
| multiplication | 1..3 | a d-digit number times a 1-digit (d = 1) or 2-digit (d >= 2) one |
| word_problems | 1..3 | a short story of d + 1 arithmetic steps about counted things |

Every reference solution works the problem step by step in plain language and ends with the
answer in `\\boxed{}`, the form `answers.is_correct` grades. Splits are disjoint by
construction: each problem's text hashes to `train` or `eval` (one in eight goes to eval), so no
seed can put one problem in both, and a held-out score never counts a problem trained on.
Generation is deterministic per (task, split, seed).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from opsd_kernels.trainer.answers import last_boxed

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")
_EVAL_ONE_IN = 8


@dataclass(frozen=True)
class Family:
    name: str
    difficulties: tuple[int, ...]
    make: Callable[[random.Random, int], tuple[str, str]]  # (problem, solution) of one draw
    default: int  # the difficulty of a bare family name


def _digits(rng: random.Random, d: int) -> int:
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)


def _addition(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = _digits(rng, d), _digits(rng, d)
    tens_a, ones_a, tens_b, ones_b = a - a % 10, a % 10, b - b % 10, b % 10
    if d == 1:
        work = f"{a} + {b} = {a + b}."
    else:
        work = (f"Split off the ones: {tens_a} + {tens_b} = {tens_a + tens_b} and "
                f"{ones_a} + {ones_b} = {ones_a + ones_b}; together "
                f"{tens_a + tens_b} + {ones_a + ones_b} = {a + b}.")
    return f"What is {a} + {b}?", f"{work} The answer is \\boxed{{{a + b}}}."


def _subtraction(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = _digits(rng, d), _digits(rng, rng.randint(1, d))
    if b < 10:
        work = f"{a} - {b} = {a - b}."
    else:
        tens_b, ones_b = b - b % 10, b % 10
        work = (f"Take away the tens first: {a} - {tens_b} = {a - tens_b}, then the ones: "
                f"{a - tens_b} - {ones_b} = {a - b}.")
    return f"What is {a} - {b}?", f"{work} The answer is \\boxed{{{a - b}}}."


def _multiplication(rng: random.Random, d: int) -> tuple[str, str]:
    a, b = _digits(rng, d), _digits(rng, 1 if d == 1 else 2)
    if b < 10:
        work = f"{a} x {b} = {a * b}."
    else:
        tens_b, ones_b = b - b % 10, b % 10
        work = (f"Split {b} into {tens_b} + {ones_b}: {a} x {tens_b} = {a * tens_b} and "
                f"{a} x {ones_b} = {a * ones_b}; together {a * tens_b} + {a * ones_b} = "
                f"{a * b}.")
    return f"What is {a} x {b}?", f"{work} The answer is \\boxed{{{a * b}}}."


_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jo")
_THINGS = ("apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards")


def _word_problem(rng: random.Random, d: int) -> tuple[str, str]:
    """d + 1 steps: a start, then d of: buys boxes of k, gives some away, finds some more."""
    name, things = rng.choice(_NAMES), rng.choice(_THINGS)
    count = rng.randint(3, 30)
    story = [f"{name} has {count} {things}."]
    steps = [f"{name} starts with {count}."]
    for _ in range(d):
        kind = rng.choice(("boxes", "give", "find"))
        if kind == "boxes":
            boxes, each = rng.randint(2, 5), rng.randint(2, 9)
            story.append(f"Then {name} buys {boxes} boxes with {each} {things} in each.")
            steps.append(f"{boxes} boxes of {each} is {boxes} x {each} = {boxes * each}, so "
                         f"{count} + {boxes * each} = {count + boxes * each}.")
            count += boxes * each
        elif kind == "give" and count > 1:
            gone = rng.randint(1, count - 1)
            story.append(f"Then {name} gives {gone} {things} to a friend.")
            steps.append(f"Giving away {gone} leaves {count} - {gone} = {count - gone}.")
            count -= gone
        else:
            found = rng.randint(1, 20)
            story.append(f"Then {name} finds {found} more {things}.")
            steps.append(f"Finding {found} more makes {count} + {found} = {count + found}.")
            count += found
    story.append(f"How many {things} does {name} have now?")
    return " ".join(story), " ".join(steps) + f" The answer is \\boxed{{{count}}}."


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("addition", (1, 2, 3, 4), _addition, default=2),
    Family("subtraction", (1, 2, 3, 4), _subtraction, default=2),
    Family("multiplication", (1, 2, 3), _multiplication, default=2),
    Family("word_problems", (1, 2, 3), _word_problem, default=1),
)}


def parse_task(task: str) -> tuple[Family, int]:
    """(family, difficulty) of `family` (its default difficulty) or `family:difficulty`."""
    name, _, level = task.partition(":")
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(f"task: unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    if not level:
        return family, family.default
    if not level.isdigit() or int(level) not in family.difficulties:
        raise ValueError(f"task: {task!r}: difficulty must be one of "
                         f"{', '.join(map(str, family.difficulties))}")
    return family, int(level)


def split_of(problem: str) -> Split:
    """The split a problem belongs to, from its text alone (stable across runs and seeds)."""
    return "eval" if zlib.crc32(problem.encode()) % _EVAL_ONE_IN == 0 else "train"


def generate(task: str, n: int, *, split: Split = "train", seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct problems of `split`: rows {"problem", "solution", "answer"} (answer: the
    boxed value, as a string). Raises when the family has fewer distinct problems."""
    family, level = parse_task(task)
    if split not in SPLITS:
        raise ValueError(f"split: {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n: {n}; expected >= 0")
    rng = random.Random(f"{family.name}:{level}:{split}:{seed}")
    rows: dict[str, dict[str, str]] = {}
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            break
        problem, solution = family.make(rng, level)
        if problem in rows or split_of(problem) != split:
            continue
        rows[problem] = {"problem": problem, "solution": solution,
                         "answer": last_boxed(solution)}
    if len(rows) < n:
        raise ValueError(f"task {task!r} has only {len(rows)} distinct {split} problems; ask "
                         "for fewer or a harder difficulty")
    return list(rows.values())
