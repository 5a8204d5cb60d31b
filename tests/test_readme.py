"""The README's "Train on your data" commands, run as written from a copy of the repository's
examples: they must work for a new user exactly as shown."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import warnings
from pathlib import Path

from opsd_kernels.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _section_commands(title: str) -> list[str]:
    """The shell lines of the section's ```sh blocks (backslash continuations joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    code = "".join(re.findall(r"```sh\n(.*?)```", section, flags=re.S))
    return [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def test_train_on_your_data_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    commands = _section_commands("Train on your data")
    assert len(commands) == 4 and all(c.startswith("opsd ") for c in commands)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    outputs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # whatever the suite's filters: what a user would see
        for command in commands:
            main(shlex.split(command)[1:])
            outputs.append(capsys.readouterr())
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if issubclass(w.category, (FutureWarning, UserWarning))]
    assert not shown, shown
    train, evaluation, sft, defaults = outputs
    assert "opsd train: 3 of 3 steps (opsd); final loss" in train.out
    assert "eval accuracy" in train.out and "runs/example/final" in train.out
    assert (tmp_path / "runs/example/checkpoints/checkpoint_2/model.safetensors").exists()
    assert json.loads(evaluation.out.strip().splitlines()[-1])["eval_problems"] == 8
    assert "(sft)" in sft.out and (tmp_path / "runs/example-sft/final").exists()
    assert "opsd train: 1 of 1 steps (opsd)" in defaults.out
    for captured in outputs:  # no progress bars of the dependencies amid the step lines
        for noise in ("Writing model shards", "Generating train split"):
            assert noise not in captured.out + captured.err, noise
