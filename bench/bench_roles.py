"""How far apart the two roles of one model start: held-out accuracy of the student prompt
(problem only) and of the teacher prompt (problem + reference solution), per task family.

    python bench/bench_roles.py [--model smollm2-135m] [--tasks addition:2,...] [--problems 48]
                                [--tokens 64] [--samples 4] [--threads 2] [--out DIR]

OPSD feeds on that gap: where the teacher answers no better than the student there is little to
distill. Greedy accuracy, and sampled accuracy at temperature 1 (--samples per problem), on the
eval split of each task (never trained on), graded two ways: the last `\\boxed{}` only (what the
prompts ask for), and with the fallback to the last number when a response has no box (a small
model often answers "81 - 70 = 11" without boxing it). Writes `<model>-<date>-roles.{json,md}`
into --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_rollouts import chat_prompts, load  # noqa: E402
from opsd_kernels.trainer import tasks  # noqa: E402
from opsd_kernels.trainer.answers import is_correct  # noqa: E402
from opsd_kernels.trainer.rollouts import HFGenerateEngine, SamplingParams  # noqa: E402

BOX = "Put your final answer in \\boxed{{}}."  # a str.format template: {{}} is {}
STUDENT = "{problem}\n" + BOX
TEACHER = ("{problem}\n\nHere is a reference solution:\n{solution}\n\nAfter understanding the "
           "reference solution, please try to solve this problem using your own approach "
           "below. " + BOX)


def accuracy(engine, tokenizer, rows, template: str, params: SamplingParams
             ) -> tuple[float, float]:
    """(boxed-only accuracy, accuracy with the last-number fallback)."""
    responses = engine.generate(chat_prompts(tokenizer, rows, template), params)
    per = params.num_samples
    texts = [tokenizer.decode(resp, skip_special_tokens=True) for resp in responses]
    answers = [rows[i // per]["answer"] for i in range(len(texts))]
    boxed = [is_correct(t, a) for t, a in zip(texts, answers, strict=True)]
    unboxed = [is_correct(t, a, unboxed=True) for t, a in zip(texts, answers, strict=True)]
    return sum(boxed) / len(boxed), sum(unboxed) / len(unboxed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="addition:2,subtraction:2,multiplication:2,"
                                       "word_problems:1")
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = HFGenerateEngine(model, pad, tokenizer.eos_token_id, share_prompts=True)
    greedy = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=args.tokens)
    sampled = SamplingParams(num_samples=args.samples, temperature=1.0,
                             max_new_tokens=args.tokens)
    results = []
    for task in args.tasks.split(","):
        rows = tasks.generate(task, args.problems, split="eval", seed=0)
        start = time.perf_counter()
        row = {"task": task, "problems": len(rows)}
        for role, template in (("student", STUDENT), ("teacher", TEACHER)):
            row[f"{role}_greedy"], row[f"{role}_greedy_unboxed"] = accuracy(
                engine, tokenizer, rows, template, greedy)
            torch.manual_seed(0)
            row[f"{role}_sampled"], row[f"{role}_sampled_unboxed"] = accuracy(
                engine, tokenizer, rows, template, sampled)
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    date = dt.date.today().isoformat()
    meta = {"model": args.model, "max_new_tokens": args.tokens, "samples": args.samples,
            "threads": args.threads, "torch": torch.__version__, "commit": commit,
            "date": date, "student_template": STUDENT, "teacher_template": TEACHER,
            "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.model}-{date}-roles"
    Path(f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"# Student vs teacher prompt, {args.model} (held-out, {args.problems} problems "
             f"per task, {args.tokens} new tokens)", "",
             f"commit {commit}, {date}, torch {torch.__version__}; sampled: temperature 1, "
             f"{args.samples} per problem", "",
             "Each cell: boxed answers only / with the last-number fallback.", "",
             "| task | student greedy | teacher greedy | student sampled | teacher sampled |",
             "|---|---|---|---|---|"]
    cell = lambda r, k: f"{r[k]:.1%} / {r[k + '_unboxed']:.1%}"  # noqa: E731
    lines += [f"| {r['task']} | {cell(r, 'student_greedy')} | {cell(r, 'teacher_greedy')} | "
              f"{cell(r, 'student_sampled')} | {cell(r, 'teacher_sampled')} |" for r in results]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
