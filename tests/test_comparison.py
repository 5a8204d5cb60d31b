"""`opsd compare` end to end on the tiny model: every (method, seed) run, the JSON document's
shape, the markdown table and the PNG; and the command line's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_fixtures import problems, small_config

from opsd_kernels.cli import main
from opsd_kernels.trainer.comparison import _write, markdown, run_comparison, summary_rows


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in problems(3, seed=3)))
    config = small_config(tmp, train_data=str(data), eval_data=str(data), max_steps=1,
                          max_new_tokens=4, problems_per_step=1, num_rollouts=2,
                          output_dir=str(tmp / "runs"))
    doc = run_comparison(config, methods=["opsd", "sft", "grpo"], seeds=[0, 1], eval_every=1,
                         eval_samples=2, out=tmp / "results")
    return tmp, doc


def test_every_method_and_seed_runs_and_is_recorded(compared) -> None:
    tmp, doc = compared
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [
        ("opsd", 0), ("sft", 0), ("grpo", 0), ("opsd", 1), ("sft", 1), ("grpo", 1)]
    keys = {"method", "seed", "task", "start_accuracy", "final_accuracy", "generated_tokens",
            "optimizer_steps", "seconds"}
    for run in doc["runs"]:
        assert keys <= set(run)
        assert run["optimizer_steps"] == 1 and [p["step"] for p in run["curve"]] == [0, 1]
        assert run["start_accuracy"] == doc["start"]["accuracy"]
        assert 0.0 <= run["final_accuracy"] <= 1.0 and run["seconds"] > 0
        # sft trains on the reference solutions: it generates nothing; the others sample
        assert (run["generated_tokens"] == 0) == (run["method"] == "sft")
    by_seed = {}
    for run in doc["runs"]:  # one sampled start per seed, shared by its methods
        by_seed.setdefault(run["seed"], set()).add(run["start_accuracy_sampled"])
    assert all(len(v) == 1 for v in by_seed.values())


def test_results_are_written_as_json_markdown_and_png(compared) -> None:
    tmp, doc = compared
    stem = f"tiny-{doc['date']}-comparison"
    saved = json.loads((tmp / "results" / f"{stem}.json").read_text())
    assert saved["model"] == "tiny" and saved["commit"] and len(saved["runs"]) == 6
    text = (tmp / "results" / f"{stem}.md").read_text()
    assert text == markdown(doc) and "| opsd | 2 |" in text and "| grpo | 2 |" in text
    assert (tmp / "results" / f"{stem}.png").stat().st_size > 10_000
    assert not (tmp / "results" / "runs").exists()  # the runs' own outputs stay in output_dir
    rows = {r["method"]: r for r in summary_rows(doc)}
    assert rows["sft"]["tokens"] == 0 and rows["opsd"]["tokens"] > 0


def test_the_table_shows_the_grader_the_config_does_not_use(compared) -> None:
    _, doc = compared
    runs = [{**r, "final_accuracy": 1.0, "final_accuracy_unboxed": 1.0,
             "final_accuracy_boxed": 0.25} for r in doc["runs"]]
    for grade_unboxed, other, shown in ((True, "boxed only", "25.0%"),
                                        (False, "last-number fallback", "100.0%")):
        text = markdown({**doc, "runs": runs,
                         "config": {**doc["config"], "grade_unboxed": grade_unboxed}})
        assert f"| final, {other} |" in text
        opsd = next(line for line in text.splitlines() if line.startswith("| opsd | 2 |"))
        assert opsd.split(" | ")[5] == f"{shown} ± 0.0%"


def test_a_tag_goes_into_the_file_names(compared) -> None:
    tmp, doc = compared
    assert doc["tag"] is None
    (tmp / "tagged").mkdir()
    _write({**doc, "tag": "answer_only"}, tmp / "tagged")
    stem = f"tiny-{doc['date']}-answer_only-comparison"
    assert sorted(p.name for p in (tmp / "tagged").iterdir()) == [
        f"{stem}.json", f"{stem}.md", f"{stem}.png"]


def test_a_tag_that_cannot_name_a_file_is_refused(tmp_path) -> None:
    config = small_config(tmp_path, train_data="x.jsonl", eval_data="x.jsonl")
    with pytest.raises(ValueError, match="tag: 'a/b' must be letters"):
        run_comparison(config, methods=["opsd"], seeds=[0], eval_every=1, eval_samples=1,
                       out=Path(tmp_path), tag="a/b")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "opsd,dpo"], "unknown method 'dpo'"),
    (["--seeds", "0,x"], "expected comma-separated integers"),
    (["--eval_every", "0"], "expected a positive integer"),
])
def test_compare_command_line_errors(tmp_path, capsys, argv, message) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--model", "tiny", "--train_data", "x.jsonl", "--eval_data",
              "x.jsonl", "--output_dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_compare_needs_both_data_sets(tmp_path) -> None:
    config = small_config(tmp_path)
    with pytest.raises(ValueError, match="train_data and config.eval_data"):
        run_comparison(config, methods=["opsd"], seeds=[0], eval_every=1, eval_samples=1,
                       out=Path(tmp_path))
