"""`opsd demo --model tiny`: on-policy self-distillation end to end on a toy, in about three
minutes on 2 CPU cores.

A small Qwen3-shaped model (random init, character tokenizer) learns two-digit addition: a
short supervised warm-up on step-by-step solutions (also under the teacher prompt, so the
small model learns to read a reference in its context, which a pretrained LLM already can),
then OPSD with LoRA and the warmed-up model as the fixed teacher: the student samples its own
answers and is pulled, token by token, towards the teacher's distribution given the reference
solution. Held-out accuracy (greedy, and sampled at the rollout temperature) is printed before
and after. On this toy task the warmed-up model already answers as well as its teacher, so the
demo shows the machinery at work (divergence falling, accuracy kept), not a gain.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from opsd_kernels.trainer.config import OPSDConfig

# Sized for about 3 minutes on 2 CPU cores; the CLI's --key value overrides any of them.
DEMO_DEFAULTS = {
    "model": "tiny", "output_dir": "runs/demo", "max_prompt_length": 128,
    "max_new_tokens": 40, "problems_per_step": 16, "seed": 0, "resume": False,
    # The reference wording, shortened: the small model reads every token on two CPU cores.
    "student_template": "Problem: {problem}\nAnswer: ",
    "teacher_template": "Problem: {problem}\nReference solution: {solution}\n"
                        "Solve it in your own way.\nAnswer: ",
    "loss_temperature": 1.0, "divergence": "jsd", "beta": 0.5, "shared_prefix": True,
    "num_rollouts": 4, "rollout_temperature": 1.0,
}
WARMUP = {"method": "sft", "max_steps": 400, "learning_rate": 3e-3, "lr_scheduler": "cosine",
          "warmup_steps": 20, "sft_teacher_prompts": True}
# The reference recipe: LoRA adapters on the warmed-up model, which stays the teacher (adapters
# off), so the teacher cannot drift towards the student.
DISTILL = {"method": "opsd", "max_steps": 40, "learning_rate": 1e-3, "problems_per_step": 8,
           "lora": True, "lora_rank": 16, "lora_alpha": 32, "teacher_mode": "fixed"}
TRAIN_PROBLEMS, EVAL_PROBLEMS, SAMPLES = 4000, 200, 4


def run_tiny_demo(overrides: dict | None = None) -> dict[str, float]:
    """Warm-up, then OPSD; returns held-out accuracy before / after (and the teacher's)."""
    from opsd_kernels.trainer.models import load_model_and_tokenizer
    from opsd_kernels.trainer.tiny import arithmetic_problems
    from opsd_kernels.trainer.trainer import OPSDTrainer

    base = {**DEMO_DEFAULTS, **(overrides or {})}
    if base.get("device", "auto") in ("auto", "cpu") and not torch.cuda.is_available() and (
            "OMP_NUM_THREADS" not in os.environ):
        torch.set_num_threads(1)  # the model's ops are too small to share: threads only wait
    out = Path(base["output_dir"])
    train = arithmetic_problems(TRAIN_PROBLEMS, seed=base["seed"])
    seen = {row["problem"] for row in train}
    held_out = [r for r in arithmetic_problems(4 * EVAL_PROBLEMS, seed=base["seed"] + 1)
                if r["problem"] not in seen][:EVAL_PROBLEMS]

    warm = OPSDConfig.from_dict({**base, **WARMUP, **(overrides or {}),
                                 "output_dir": str(out / "warmup")})
    model, tokenizer = load_model_and_tokenizer(warm)
    started = time.perf_counter()
    print(f"opsd demo: tiny Qwen3 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {len(tokenizer)}-token character vocabulary) on {warm.device}; "
          f"{len(train)} train / {len(held_out)} held-out addition problems")
    warmup = OPSDTrainer(model, tokenizer, train, warm)
    evaluation, _ = warmup.encode(held_out)
    print(f"[1/2] supervised warm-up: {warm.max_steps} steps")
    warmup.train()
    before, sampled_before = _accuracy(warmup, evaluation)
    teacher = warmup.evaluate(evaluation, prompt="teacher")["eval_accuracy"]
    print(f"      held-out accuracy {before:.1%} greedy, {sampled_before:.1%} sampled (student "
          f"prompt); {teacher:.1%} greedy under the teacher prompt (solution in context)")

    distill = OPSDConfig.from_dict({**base, **DISTILL, **(overrides or {}),
                                    "output_dir": str(out / "opsd")})
    print(f"[2/2] OPSD: {distill.max_steps} steps, {distill.num_rollouts} rollouts per "
          f"problem, {distill.divergence} (beta {distill.beta}), teacher "
          f"{distill.teacher_mode!r}, shared prefixes {'on' if distill.shared_prefix else 'off'}")
    # The same prompts: the warm-up's encoded problems are reused (and not reported again).
    trainer = OPSDTrainer(warmup.model, tokenizer, warmup.train_problems, distill)
    history = trainer.train()
    after, sampled_after = _accuracy(trainer, evaluation)
    elapsed = time.perf_counter() - started
    first, last = history[0], history[-1]
    print(f"      divergence {first['divergence']:.4f} -> {last['divergence']:.4f}, rollout "
          f"accuracy {first['accuracy']:.1%} -> {last['accuracy']:.1%}")
    print(f"held-out accuracy ({len(held_out)} problems): greedy {before:.1%} before OPSD, "
          f"{after:.1%} after; sampled (T = {distill.rollout_temperature}, "
          f"{SAMPLES} per problem) {sampled_before:.1%} before, {sampled_after:.1%} after; "
          f"{elapsed:.0f} s in all")
    print(f"metrics: {out / 'opsd' / 'metrics.jsonl'}; model: {out / 'opsd' / 'final'}")
    return {"before": before, "after": after, "sampled_before": sampled_before,
            "sampled_after": sampled_after, "teacher": teacher, "seconds": elapsed}


def _accuracy(trainer, problems) -> tuple[float, float]:
    """Greedy accuracy, and the mean accuracy of `SAMPLES` samples at the rollout temperature
    (the distribution OPSD trains on)."""
    greedy = trainer.evaluate(problems)["eval_accuracy"]
    sampled = trainer.evaluate(problems, num_samples=SAMPLES,
                               temperature=trainer.config.rollout_temperature)["eval_accuracy"]
    return greedy, sampled
