"""Problems with reference solutions, from JSONL, Parquet, a directory saved by `datasets`, or
rows in memory. Bad data fails at load time with the column or rows to fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_kernels.trainer.answers import last_boxed


@dataclass(frozen=True)
class Problem:
    problem: str
    solution: str
    answer: str | None  # the reference final answer; None: the solution has no \boxed{}


def _read_table(source: str | Path) -> Any:
    import datasets

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data: {source} does not exist")
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"data: {source} holds splits {list(data)}; expected a "
                                 "'train' split or a single dataset")
            data = data["train"]
        return data
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kind = kinds.get(path.suffix)
    if kind is None:
        raise ValueError(f"data: {source}: unknown format {path.suffix!r}; use .jsonl, "
                         ".parquet or a directory written by datasets' save_to_disk")
    # A local file of problems needs no "Generating train split" bar amid the run's output.
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    finally:
        if quiet:
            datasets.enable_progress_bars()


def load_problems(source: str | Path | Iterable[Mapping[str, Any]], *,
                  problem_column: str = "problem", solution_column: str = "solution",
                  answer_column: str | None = "answer") -> list[Problem]:
    """Rows of ``source`` as `Problem`s.

    Args:
        source: a path (.jsonl, .parquet, or a `datasets` directory), a `datasets.Dataset`, or
            any iterable of mappings.
        problem_column, solution_column: required, non-empty text columns.
        answer_column: optional; when the column is absent, each answer is the solution's last
            ``\\boxed{...}``.

    Raises:
        ValueError: a required column is missing, or rows have an empty problem / solution.
    """
    table = _read_table(source) if isinstance(source, (str, Path)) else source
    name = str(source) if isinstance(source, (str, Path)) else "data"
    columns = getattr(table, "column_names", None)
    rows = list(table)
    if columns is None:
        columns = sorted({key for row in rows for key in row})
    for column in (problem_column, solution_column):
        if column not in columns:
            raise ValueError(f"{name}: no column {column!r} (columns: {list(columns)}); set "
                             "problem_column / solution_column to the names your data uses")
    use_answer = answer_column is not None and answer_column in columns
    empty: list[int] = []
    problems = []
    for i, row in enumerate(rows):
        problem, solution = row.get(problem_column), row.get(solution_column)
        if not _text(problem) or not _text(solution):
            empty.append(i)
            continue
        answer = row.get(answer_column) if use_answer else None
        answer = str(answer).strip() if answer is not None and str(answer).strip() else None
        problems.append(Problem(str(problem), str(solution), answer or last_boxed(solution)))
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"{name}: {len(empty)} row(s) have an empty {problem_column!r} or "
                         f"{solution_column!r} (rows {shown}); remove or fill them")
    if not problems:
        raise ValueError(f"{name}: no rows")
    return problems


TASK_PREFIX = "task:"


def load_data(source: str | Path | Iterable[Mapping[str, Any]], config: Any,
              split: str) -> list[Problem]:
    """``source`` read per ``config`` (an `OPSDConfig`): a built-in task
    (``task:addition:2``) gives ``config.task_{split}_problems`` problems of its ``split``
    (``train`` or ``eval``; always drawn with seed 0, so every run of a comparison sees the same
    problems), anything else goes to `load_problems` with the config's columns."""
    if isinstance(source, str) and source.startswith(TASK_PREFIX):
        from opsd_kernels.trainer import tasks

        count = getattr(config, f"task_{split}_problems")
        return load_problems(tasks.generate(source.removeprefix(TASK_PREFIX), count,
                                            split=split, seed=0))
    return load_problems(source, problem_column=config.problem_column,
                         solution_column=config.solution_column,
                         answer_column=config.answer_column)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
