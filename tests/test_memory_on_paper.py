"""bench/memory_on_paper.py: the model shapes give the published parameter counts, and the
table's loss columns follow the sizes they are made of."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import memory_on_paper as paper  # noqa: E402


@pytest.mark.parametrize("name, published", [("Qwen3-1.7B", 1.72e9), ("Qwen3-8B", 8.19e9)])
def test_parameter_counts_match_the_model_cards(name: str, published: float) -> None:
    shape = next(m for m in paper.QWEN3 if m.name == name)
    assert abs(shape.params - published) / published < 0.005


def test_naive_loss_grows_with_tokens_and_the_fused_ones_barely() -> None:
    m = paper.QWEN3[0]
    small, large = paper.loss_memory(m, 4096, 8), paper.loss_memory(m, 16384, 8)
    assert large["naive"] / small["naive"] > 3.5
    assert large["opsd fused"] - small["opsd fused"] == 2 * (16384 - 4096) * m.hidden
    assert large["opsd vocab-parallel"] < large["opsd fused"] < large["Liger chunked"]


def test_cli_prints_the_table_and_checks_arguments(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    run = subprocess.run([sys.executable, str(BENCH / "memory_on_paper.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and out.read_text() == run.stdout
    assert "| Qwen3-8B |" in run.stdout and "16384 loss tokens" in run.stdout
    bad = subprocess.run([sys.executable, str(BENCH / "memory_on_paper.py"), "--gpus", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--gpus: 0" in bad.stderr
