"""Rollout speed of the trainer's engine: generated tokens per second, on a real model.

    python bench/bench_rollouts.py [--model smollm2-135m] [--prompts 16] [--samples 4]
                                   [--tokens 48] [--threads 2] [--rounds 3] [--out DIR]

The prompts are chat-formatted problems of `--task` (held-out split), sampled at temperature 1
as the trainer's rollouts are. Variants, run in interleaved rounds (so a change of machine load
hits all of them) and reported as the median tokens per second and its ratio to `loop`:

  loop      one `generate` call per prompt and sample, batch 1: what a plain script does
  batched   `HFGenerateEngine`: left-padded prompts in one call, `num_return_sequences`
            (each prompt is encoded once per sample)
  shared    `HFGenerateEngine(share_prompts=True)`: each prompt encoded once, its KV cache
            repeated for its samples
  static    `batched` with transformers' static KV cache (`cache_implementation="static"`)
  compiled  `static` with the decoding step compiled by torch.compile (transformers'
            `CompileConfig`; on CUDA `static` does this by itself, on CPU only when asked);
            its compilation falls in the warm-up round

`--variants` picks some (the ratio column is then against the first one named).

Tokens count what the responses keep (up to and including eos), not padding. Writes
`<device>-<date>-rollouts.{json,md}` into --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opsd_kernels.trainer import model_sources, tasks  # noqa: E402
from opsd_kernels.trainer.rollouts import HFGenerateEngine, SamplingParams  # noqa: E402

VARIANTS = ("loop", "batched", "shared", "static", "compiled")


def load(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_sources.resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer


def chat_prompts(tokenizer, rows: list[dict[str, str]], template: str) -> list[list[int]]:
    """Token ids of each row's `template` (a str.format of its fields) as one user turn."""
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": template.format(**r)}], add_generation_prompt=True,
        tokenize=True, return_dict=False) for r in rows]


def prompts(tokenizer, task: str, n: int) -> list[list[int]]:
    rows = tasks.generate(task, n, split="eval", seed=0)
    return chat_prompts(tokenizer, rows, "{problem} Put the final answer in \\boxed{{}}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="addition:2")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated; the ratio is against the first")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    for name in ("prompts", "samples", "tokens", "threads", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: {getattr(args, name)}; expected >= 1")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown or 'none given'}; choose from {VARIANTS}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    ids = prompts(tokenizer, args.task, args.prompts)
    params = SamplingParams(num_samples=args.samples, temperature=1.0,
                            max_new_tokens=args.tokens)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    pad = eos if pad is None else pad
    from transformers import CompileConfig

    on_cpu = CompileConfig()
    on_cpu._compile_all_devices = True  # transformers compiles only on accelerators unless told
    engines = {"batched": HFGenerateEngine(model, pad, eos),
               "shared": HFGenerateEngine(model, pad, eos, share_prompts=True),
               "static": HFGenerateEngine(model, pad, eos,
                                          generate_kwargs={"cache_implementation": "static"}),
               "compiled": HFGenerateEngine(model, pad, eos, generate_kwargs={
                   "cache_implementation": "static", "compile_config": on_cpu})}
    one = SamplingParams(num_samples=1, temperature=1.0, max_new_tokens=args.tokens)

    def loop() -> list[list[int]]:
        return [r for p in ids for _ in range(args.samples)
                for r in engines["batched"].generate([p], one)]

    every = {"loop": loop, **{k: (lambda e=e: e.generate(ids, params))
                              for k, e in engines.items()}}
    variants = {n: every[n] for n in names}
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, run in variants.items():
            torch.manual_seed(round_)
            start = time.perf_counter()
            responses = run()
            seconds = time.perf_counter() - start
            assert len(responses) == args.prompts * args.samples
            if round_:
                speeds[name].append(sum(map(len, responses)) / seconds)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s"
                                                  for k, v in speeds.items()), flush=True)
    median = {k: statistics.median(v) for k, v in speeds.items()}
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    date = dt.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    meta = {"model": args.model, "task": args.task, "prompts": args.prompts,
            "samples": args.samples, "max_new_tokens": args.tokens, "threads": args.threads,
            "rounds": args.rounds, "device": f"{cpu} ({args.threads} threads)",
            "torch": torch.__version__, "commit": commit, "date": date,
            "tokens_per_s": speeds, "median_tokens_per_s": median}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-{args.threads}-threads-{date}-rollouts"
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"# Rollout speed: {args.model}, {args.prompts} prompts x {args.samples} samples, "
             f"{args.tokens} new tokens, T = 1", "",
             f"{meta['device']}, torch {torch.__version__}, commit {commit}, {date}; median of "
             f"{args.rounds} interleaved rounds", "",
             f"| variant | tokens / s | vs {names[0]} |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {v / median[names[0]]:.2f}x |" for k, v in median.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
