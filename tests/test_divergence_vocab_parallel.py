"""The vocabulary-parallel fused divergence: 2 and 3 ranks under torchrun (gloo on CPU), each
holding a ragged slice of the head, give the float64 oracle's loss and gradients on the full
logits (tests/vocab_parallel_worker.py runs the cases); one process is its own group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vocab_parallel_worker import CASES, run_case

from opsd_kernels.divergence_vocab_parallel import vocab_parallel_linear_divergence

WORKER = Path(__file__).parent / "vocab_parallel_worker.py"
TOL = 2e-5  # fp32 logits and sums against float64


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_the_single_process_oracle(tmp_path: Path, world: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
         "--master_port", str(29700 + world * 10 + os.getpid() % 10), str(WORKER),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(world):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert result["world"] == world and set(result["cases"]) == set(CASES)
        bad = {f"{case}/{what}": err for case, errs in result["cases"].items()
               for what, err in errs.items() if not err <= TOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("case", list(CASES))
def test_one_process_is_its_own_group(case: str) -> None:
    """Without an initialised process group the one slice is the whole head."""
    errors = run_case(case, CASES[case], rank=0, world=1)
    assert all(err <= TOL for err in errors.values()), errors


def test_refused_options_name_the_argument() -> None:
    h = torch.randn(4, 8)
    w = torch.randn(5, 8)
    kwargs = dict(vocab_start=0, vocab_size=5)
    cases = [
        (dict(top_k=2), "top_k: not supported"),
        (dict(reduction="sequence_mean"), "reduction: 'sequence_mean' is not supported"),
        (dict(divergence="sampled"), "labels: divergence='sampled' needs"),
        (dict(vocab_start=3), "vocab_start: 3 with 5 rows"),
        (dict(temperature=0.0), "temperature: must be a finite number > 0, got 0.0"),
        (dict(beta=1.5), "beta: must be in \\[0, 1\\]"),
        (dict(clip=-1.0), "clip: must be a finite number > 0"),
        (dict(chunk_size=0), "chunk_size: must be a positive integer"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), "labels: expected shape \\(4,\\)"),
        (dict(labels=torch.full((4,), 7)), "labels: values must be in \\[0, 5\\)"),
        (dict(token_weights=torch.ones(4, requires_grad=True)), "token_weights: must not"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            vocab_parallel_linear_divergence(h, w, h, **{**kwargs, **extra})
    with pytest.raises(ValueError, match="teacher_hidden: must not require grad"):
        vocab_parallel_linear_divergence(h, w, h.clone().requires_grad_(), **kwargs)
    with pytest.raises(ValueError, match="weight_shard: expected \\[V_r, 8\\]"):
        vocab_parallel_linear_divergence(h, torch.randn(5, 7), h, **kwargs)
