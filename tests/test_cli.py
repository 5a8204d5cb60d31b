"""The `opsd` command line: train from a YAML file with flags, evaluate a checkpoint, the demo end
to end (shortened), help generated from the config, one-line errors, and a start-up that
parses before importing torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
from trainer_fixtures import TEMPLATES

from opsd_kernels.cli import main
from opsd_kernels.trainer.config import OPSDConfig
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # whatever the suite's filters: what a user would see
        main(["train", "--config", config, "--max_steps", "2", "--save_steps", "1",
              "--lora", "true", "--lora_rank", "4", "--teacher_mode", "fixed"])
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if issubclass(w.category, (FutureWarning, UserWarning))]
    assert not shown, shown
    run = tmp_path / "run"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 2] and "eval_accuracy" in steps[-1]
    assert (run / "final" / "adapter_config.json").exists()
    out, err = capsys.readouterr()
    # the end-of-run summary: final loss, eval accuracy, where everything went
    assert "opsd train: 2 of 2 steps (opsd); final loss" in out
    assert "eval accuracy" in out and "on 6 problems" in out
    for where in (run / "final", run / "metrics.jsonl", run / "checkpoints"):
        assert str(where) in out
    assert "step 1/2: loss" in out  # no progress bar: one line per logged step
    # no progress bars of the dependencies amid the step lines
    for noise in ("Writing model shards", "Generating train split"):
        assert noise not in out + err, noise
    main(["eval", "--config", config, "--checkpoint",
          str(run / "checkpoints" / "checkpoint_2"), "--lora", "true", "--lora_rank", "4",
          "--teacher_mode", "fixed"])
    out = capsys.readouterr().out
    assert "eval data: 6 problems" in out and "train data" not in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["eval_problems"] == 6 and 0.0 <= result["eval_accuracy"] <= 1.0


def test_flags_reach_the_config_with_their_types(tmp_path) -> None:
    from opsd_kernels.cli import _config, _explicit_values

    values, flags = _explicit_values("train", [
        "--learning_rate", "1e-5", "--lora", "--clip", "null", "--lora-target-modules",
        "q_proj", "v_proj", "--teacher_mode", "fixed", "--config", "c.yaml"])
    assert values == {"learning_rate": 1e-5, "lora": True, "clip": None,
                      "lora_target_modules": ["q_proj", "v_proj"], "teacher_mode": "fixed"}
    assert flags == {"config": "c.yaml"}
    config = _config(None, values)
    assert config.lora and config.lora_target_modules == ["q_proj", "v_proj"]


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line on stderr, no traceback, no usage block
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--learnig_rate", "1"], "cfg.yaml: unknown field 'learnig_rate'"),
    (["--max_step", "3"], "opsd train: unrecognized argument --max_step; did you mean "
                          "--max_steps?"),
    (["--teacher_mode", "fixed"], "set lora: true"),
    (["--teacher_mode", "frozen"], "invalid choice: 'frozen' (choose from"),
    (["--max_steps", "ten"], "invalid int value: 'ten'"),
    (["--max_steps"], "argument --max_steps/--max-steps: expected one argument"),
    (["max_steps", "3"], "unrecognized argument max_steps"),
    (["--train_data", "nowhere.jsonl"], "does not exist"),
    (["--max_prompt_length", "2000", "--max_new_tokens", "100", "--train_data",
      "nowhere.jsonl"], "exceeds the model's max_position_embeddings 2048; lower "
                        "max_prompt_length (now 2000) or max_new_tokens (now 100)"),
])
def test_bad_train_input_is_one_line(tmp_path, capsys, argv, message) -> None:
    config, _ = _files(tmp_path)
    if argv[0] == "--learnig_rate":  # a typo in the file is reported as the file's
        with open(config, "a") as f:
            f.write("learnig_rate: 1\n")
        argv = []
    line = _one_line_error(capsys, ["train", "--config", config, *argv])
    assert message in line


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "nope.yaml"], "opsd train: nope.yaml: no such config file"),
    (["train"], "config.train_data: required for opsd train"),
    (["eval", "--model", "tiny"], "config.eval_data: required for opsd eval"),
    (["bench", "--tokens", "-5"], "argument --tokens: expected a positive integer, got -5"),
    (["bench", "--tokens", "0"], "argument --tokens: expected a positive integer, got 0"),
    (["bench", "--vocab", "x"], "argument --vocab: expected a positive integer, got 'x'"),
    (["env", "--verbose"], "unrecognized arguments: --verbose"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_every_cli_error_is_one_line(capsys, argv, message) -> None:
    line = _one_line_error(capsys, argv)
    assert message in line and line.startswith("opsd")


def test_train_help_lists_every_config_field_with_default_and_meaning(capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["train", "--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(OPSDConfig):
        assert f"--{field.name}" in text, field.name
        meaning = " ".join(field.metadata["help"].split())
        assert meaning in text, field.name
    assert "--config" in text and "{opsd,sft,grpo}" in text and "(default: 100)" in text


@pytest.mark.parametrize("command, expected", [
    ("bench", ["--tokens", "default 4096 on a GPU, 1024 on a CPU", "--hidden", "--vocab"]),
    ("demo", ["--device", "--max_steps", "--learning_rate"]),
    ("eval", ["--checkpoint", "--eval_data", "--config"]),
])
def test_help_of_the_other_commands(capsys, command, expected) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text


def test_help_parses_before_importing_torch() -> None:
    code = ("import sys\nfrom opsd_kernels.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['bench', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "    assert 'torch' not in sys.modules, argv\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr


def test_tiny_demo_runs_end_to_end_when_shortened(tmp_path, capsys, monkeypatch) -> None:
    import opsd_kernels.trainer.demo_tiny as demo

    monkeypatch.setattr(demo, "TRAIN_PROBLEMS", 64)
    monkeypatch.setattr(demo, "EVAL_PROBLEMS", 8)
    main(["demo", "--model", "tiny", "--device", "cpu", "--output_dir", str(tmp_path / "demo"),
          "--max_steps", "2", "--max_new_tokens", "8", "--problems_per_step", "2",
          "--progress_bar", "false"])
    out = capsys.readouterr().out
    assert "held-out accuracy (8 problems): greedy" in out and "before OPSD" in out
    assert out.count("train data:") == 1
    assert (tmp_path / "demo" / "opsd" / "metrics.jsonl").exists()


def test_env_lists_backends(capsys) -> None:
    main(["env"])
    out = capsys.readouterr().out
    assert "torch" in out and "native" in out


@pytest.mark.parametrize("sizes", [dict(n=0), dict(hidden=-3), dict(vocab=2.5)])
def test_bench_sizes_are_checked_when_called_directly(sizes) -> None:
    from opsd_kernels.compare import run_comparison

    with pytest.raises(ValueError, match="expected a positive integer"):
        run_comparison(**sizes)


def test_bench_runs_at_the_sizes_given(capsys) -> None:
    main(["bench", "--tokens", "16", "--hidden", "8", "--vocab", "33"])
    out = capsys.readouterr().out
    assert "N=16 tokens, H=8, V=33" in out and "sampled token" in out
