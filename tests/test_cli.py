"""The `opsd` command line: train from a YAML file with overrides, evaluate a checkpoint, the
demo end to end (shortened), and bad input exiting with a message."""

from __future__ import annotations

import json

import pytest
from trainer_fixtures import TEMPLATES

from opsd_kernels.cli import main
from opsd_kernels.trainer.tiny import arithmetic_problems


def _files(tmp_path) -> tuple[str, str]:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_problems(6, seed=0)))
    config = tmp_path / "cfg.yaml"
    lines = {"model": "tiny", "device": "cpu", "train_data": str(data), "eval_data": str(data),
             "output_dir": str(tmp_path / "run"), "max_new_tokens": 12,
             "max_prompt_length": 96, "num_rollouts": 2, "problems_per_step": 2,
             "max_steps": 5, "progress_bar": False, **TEMPLATES}
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    return str(config), str(data)


def test_train_then_eval_a_checkpoint(tmp_path, capsys) -> None:
    config, _ = _files(tmp_path)
    main(["train", "--config", config, "--max_steps", "2", "--save_steps", "1",
          "--lora", "true", "--lora_rank", "4", "--teacher_mode", "fixed"])
    run = tmp_path / "run"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 2] and "eval_accuracy" in steps[-1]
    assert (run / "final" / "adapter_config.json").exists()
    capsys.readouterr()
    main(["eval", "--config", config, "--checkpoint", str(run / "checkpoint-2"),
          "--lora", "true", "--lora_rank", "4", "--teacher_mode", "fixed"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_problems"] == 6 and 0.0 <= result["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--learnig_rate", "1"], "unknown field 'learnig_rate'"),
    (["--teacher_mode", "fixed"], "set lora: true"),
    (["--train_data", "nowhere.jsonl"], "does not exist"),
])
def test_bad_input_exits_with_a_message(tmp_path, capsys, argv, message) -> None:
    config, _ = _files(tmp_path)
    with pytest.raises((SystemExit, FileNotFoundError)) as raised:
        main(["train", "--config", config, *argv])
    if raised.type is SystemExit:
        assert raised.value.code == 2
        assert message in capsys.readouterr().err
    else:
        assert message in str(raised.value)


def test_demo_runs_end_to_end_when_shortened(tmp_path, capsys, monkeypatch) -> None:
    import opsd_kernels.trainer.demo as demo

    monkeypatch.setattr(demo, "TRAIN_PROBLEMS", 64)
    monkeypatch.setattr(demo, "EVAL_PROBLEMS", 8)
    main(["demo", "--device", "cpu", "--output_dir", str(tmp_path / "demo"), "--max_steps", "2",
          "--max_new_tokens", "8", "--problems_per_step", "2", "--progress_bar", "false"])
    out = capsys.readouterr().out
    assert "held-out accuracy (8 problems): greedy" in out and "before OPSD" in out
    assert (tmp_path / "demo" / "opsd" / "metrics.jsonl").exists()


def test_env_lists_backends(capsys) -> None:
    main(["env"])
    out = capsys.readouterr().out
    assert "torch" in out and "native" in out
