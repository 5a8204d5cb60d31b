"""`opsd compare`: OPSD against its baselines (sft, grpo) from the same start, on the same
problems, over several seeds, in the one trainer and rollout engine.

Each run loads the model afresh, trains ``max_steps`` optimizer steps of its method with the
seed's data order and sampling, and is evaluated on the held-out problems every ``eval_every``
steps (greedy) and at its end (greedy, and sampled at the rollout temperature). Evaluation time
is not counted in a run's seconds. The greedy start is one number for every run (greedy decoding
does not depend on the seed); the sampled start is measured once per seed.

Writes ``<model>-<date>[-<tag>]-comparison.json`` (shaped ``{"model", "commit", "runs": [{"method",
"seed", "task", "start_accuracy", "final_accuracy", "generated_tokens", "optimizer_steps",
"seconds", ...}]}``, greedy accuracies as fractions), a markdown table of mean and standard
deviation per method, and a PNG of held-out accuracy against optimizer steps and against
generated tokens.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from opsd_kernels.trainer.config import OPSDConfig

METHODS = ("opsd", "sft", "grpo")


def run_comparison(config: OPSDConfig, *, methods: list[str], seeds: list[int],
                   eval_every: int, eval_samples: int, out: str | Path,
                   tag: str | None = None) -> dict:
    """Train every (method, seed) from ``config`` (the same hyperparameters for every method)
    and write the results into ``out``, named with ``tag`` when given (so an ablation's files
    sit beside the main comparison's); returns the JSON document."""
    from opsd_kernels.trainer.models import load_model_and_tokenizer
    from opsd_kernels.trainer.trainer import OPSDTrainer

    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods: unknown method {method!r}; choose from {METHODS}")
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    if config.train_data is None or config.eval_data is None:
        raise ValueError("config.train_data and config.eval_data: both required by opsd compare")
    if eval_every <= 0 or eval_samples <= 0:
        raise ValueError("eval_every and eval_samples: must be > 0")
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_.]+", tag):
        raise ValueError(f"tag: {tag!r} must be letters, digits, '_' or '.' (it names files)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    doc: dict[str, Any] = {"model": config.model, "commit": _commit(), "date": str(dt.date.today()),
                           "machine": _machine(), "config": asdict(config), "methods": methods,
                           "seeds": seeds, "eval_every": eval_every, "eval_samples": eval_samples,
                           "tag": tag, "runs": []}
    model, tokenizer = load_model_and_tokenizer(config)
    runs_dir = Path(config.output_dir)  # each run's metrics.jsonl; the results go to ``out``
    first = OPSDTrainer(model, tokenizer, config.train_data, config.replace(
        output_dir=str(runs_dir / "start")), eval_dataset=config.eval_data)
    train, held_out = first.train_problems, first.eval_problems
    doc["start"] = _greedy(first)
    doc["teacher"] = _greedy(first, prompt="teacher")
    doc["eval_problems"] = len(held_out)
    print(f"opsd compare: start {_fmt(doc['start'])}; teacher prompt "
          f"{_fmt(doc['teacher'])} on {len(held_out)} held-out problems", flush=True)
    del first, model
    sampled_start: dict[int, float] = {}  # per seed: the same start for every method
    for seed in seeds:
        for method in methods:
            run_config = config.replace(method=method, seed=seed, eval_steps=0, save_steps=0,
                                        resume=False, progress_bar=False,
                                        output_dir=str(runs_dir / f"{method}-{seed}"))
            model, tokenizer = load_model_and_tokenizer(run_config)
            trainer = OPSDTrainer(model, tokenizer, train, run_config, eval_dataset=held_out)
            if seed not in sampled_start:
                sampled_start[seed] = _sampled(trainer, eval_samples, seed)
            run = _train_and_track(trainer, doc["start"], sampled_start[seed], eval_every,
                                   eval_samples)
            doc["runs"].append(run)
            print(f"  {method} seed {seed}: {_fmt(doc['start'])} -> "
                  f"{_fmt(run['curve'][-1])} greedy in {run['optimizer_steps']} steps, "
                  f"{run['generated_tokens']} generated tokens, {run['seconds']:.0f} s",
                  flush=True)
            _write(doc, out)  # after every run: a long comparison keeps what it has
    doc["seconds"] = time.perf_counter() - started
    return _write(doc, out)


def _greedy(trainer, prompt: str = "student") -> dict[str, float]:
    result = trainer.evaluate(prompt=prompt)
    return {"accuracy": result["eval_accuracy"],
            "accuracy_boxed": result["eval_accuracy_boxed"],
            "accuracy_unboxed": result["eval_accuracy_unboxed"]}


def _sampled(trainer, samples: int, seed: int) -> float:
    torch.manual_seed(seed)
    return trainer.evaluate(num_samples=samples,
                            temperature=trainer.config.rollout_temperature)["eval_accuracy"]


def _train_and_track(trainer, start: dict[str, float], start_sampled: float, eval_every: int,
                     eval_samples: int) -> dict[str, Any]:
    c = trainer.config
    run = {"method": c.method, "seed": c.seed, "task": _task_name(c.train_data),
           "start_accuracy": start["accuracy"], "start_accuracy_sampled": start_sampled,
           "curve": [{"step": 0, "generated_tokens": 0, "seconds": 0.0, **start}],
           "history": []}
    generated, seconds = 0, 0.0
    while trainer.step < c.max_steps:
        record = trainer.train_step()
        seconds += record["step_s"]
        if c.method != "sft":  # sft trains on reference solutions: it generates nothing
            generated += round(record["response_length"] * c.problems_per_step
                               * c.num_rollouts * c.gradient_accumulation_steps
                               * trainer.accelerator.num_processes)
        run["history"].append(record)
        if trainer.step % eval_every == 0 or trainer.step == c.max_steps:
            point = {"step": trainer.step, "generated_tokens": generated, "seconds": seconds,
                     **_greedy(trainer)}
            run["curve"].append(point)
            print(f"    {c.method} seed {c.seed} step {trainer.step}: {_fmt(point)} greedy "
                  f"(last-number fallback {point['accuracy_unboxed']:.1%}), loss "
                  f"{record['loss']:.4f}, {seconds:.0f} s", flush=True)
    final = run["curve"][-1]
    run.update(final_accuracy=final["accuracy"],
               final_accuracy_sampled=_sampled(trainer, eval_samples, c.seed),
               start_accuracy_boxed=start["accuracy_boxed"],
               final_accuracy_boxed=final["accuracy_boxed"],
               start_accuracy_unboxed=start["accuracy_unboxed"],
               final_accuracy_unboxed=final["accuracy_unboxed"],
               generated_tokens=generated, optimizer_steps=trainer.step, seconds=seconds)
    return run


def _task_name(source: Any) -> str:
    return source.removeprefix("task:") if isinstance(source, str) else "data"


def _fmt(result: dict[str, float]) -> str:
    return f"{result['accuracy']:.1%}"


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    found = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root,
                           capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return (f"{platform.processor() or platform.machine()}, {threads} "
            f"thread{'s' if threads != 1 else ''}")


# --- the report ----------------------------------------------------------------------------

def _stem(doc: dict) -> str:
    name = Path(str(doc["model"])).name.removesuffix(".gguf")
    tag = f"-{doc['tag']}" if doc.get("tag") else ""
    return f"{name}-{doc['date']}{tag}-comparison"


def _write(doc: dict, out: Path) -> dict:
    stem = _stem(doc)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(doc))
    if doc["runs"]:
        plot(doc, out / f"{stem}.png")
    return doc


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1%}" if values else "-"
    return f"{statistics.mean(values):.1%} ± {statistics.stdev(values):.1%}"


def summary_rows(doc: dict) -> list[dict[str, Any]]:
    """Per method: the mean and standard deviation over seeds of each result."""
    rows = []
    for method in doc["methods"]:
        runs = [r for r in doc["runs"] if r["method"] == method]
        if not runs:
            continue
        rows.append({
            "method": method, "seeds": len(runs),
            "final": [r["final_accuracy"] for r in runs],
            "gain": [r["final_accuracy"] - r["start_accuracy"] for r in runs],
            "final_boxed": [r["final_accuracy_boxed"] for r in runs],
            "final_unboxed": [r["final_accuracy_unboxed"] for r in runs],
            "sampled_start": [r["start_accuracy_sampled"] for r in runs],
            "sampled_final": [r["final_accuracy_sampled"] for r in runs],
            "tokens": statistics.mean(r["generated_tokens"] for r in runs),
            "steps": runs[0]["optimizer_steps"],
            "seconds": statistics.mean(r["seconds"] for r in runs)})
    return rows


def markdown(doc: dict) -> str:
    c = doc["config"]
    start, teacher = doc["start"], doc["teacher"]
    # The table's second grader: the one the config does not grade with.
    second, other = (("final_boxed", "boxed only") if c["grade_unboxed"]
                     else ("final_unboxed", "last-number fallback"))
    lines = [
        f"# OPSD against SFT and GRPO: {doc['model']}",
        "",
        f"commit {doc['commit']}, {doc['date']}, {doc['machine']}; train "
        f"`{c['train_data']}`, held-out `{c['eval_data']}` ({doc['eval_problems']} problems, "
        f"never trained on); seeds {', '.join(map(str, doc['seeds']))}; "
        f"{c['problems_per_step']} problems x {c['num_rollouts']} rollouts per step, "
        f"{c['max_new_tokens']} new tokens, rollout temperature {c['rollout_temperature']}.",
        "",
        f"Greedy accuracy at the start: {start['accuracy']:.1%} "
        f"(boxed only {start['accuracy_boxed']:.1%}, with the last-number fallback "
        f"{start['accuracy_unboxed']:.1%}); the same model under the teacher prompt "
        f"(the config's teacher_template, in the JSON): {teacher['accuracy']:.1%}.",
        "",
        "Mean ± standard deviation over seeds. Accuracy is greedy on the held-out problems, "
        f"graded {'with' if c['grade_unboxed'] else 'without'} the last-number fallback "
        "unless a column says otherwise; sampled: "
        f"{doc['eval_samples']} samples per problem at the rollout temperature.",
        *([f"Run: {doc['note']}.", ""] if doc.get("note") else [""]),
        f"| method | seeds | steps | final greedy | gain over start | final, {other} | "
        "sampled start | sampled final | generated tokens | train seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary_rows(doc):
        gain = row["gain"]
        gain_text = f"{statistics.mean(gain):+.1%}" + (
            f" ± {statistics.stdev(gain):.1%}" if len(gain) > 1 else "")
        lines.append(
            f"| {row['method']} | {row['seeds']} | {row['steps']} | {_mean_std(row['final'])} "
            f"| {gain_text} | {_mean_std(row[second])} "
            f"| {_mean_std(row['sampled_start'])} | {_mean_std(row['sampled_final'])} "
            f"| {row['tokens']:.0f} | {row['seconds']:.0f} |")
    lines += ["", "Per run (greedy accuracy after each evaluation, by optimizer step):", "",
              "| method | seed | curve |", "|---|---|---|"]
    for run in doc["runs"]:
        curve = ", ".join(f"{p['step']}: {p['accuracy']:.1%}" for p in run["curve"])
        lines.append(f"| {run['method']} | {run['seed']} | {curve} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for run in doc["runs"]:
        steps = [p["step"] for p in run["curve"]]
        tokens = [p["generated_tokens"] for p in run["curve"]]
        accuracy = [100 * p["accuracy"] for p in run["curve"]]
        label = run["method"] if run["seed"] == doc["seeds"][0] else None
        axes[0].plot(steps, accuracy, color=colours[run["method"]], alpha=0.7, label=label,
                     marker="o", markersize=3)
        if run["method"] != "sft":
            axes[1].plot(tokens, accuracy, color=colours[run["method"]], alpha=0.7,
                         label=label, marker="o", markersize=3)
    teacher = 100 * doc["teacher"]["accuracy"]
    for ax in axes:
        ax.axhline(teacher, color="grey", linestyle="--", linewidth=1,
                   label="teacher prompt (start)")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("optimizer steps")
    axes[1].set_xlabel("generated tokens (sft generates none)")
    axes[0].set_ylabel("held-out greedy accuracy (%)")
    axes[0].legend()
    fig.suptitle(f"{doc['model']}: {doc['config']['train_data']}, seeds "
                 f"{', '.join(map(str, doc['seeds']))} (commit {doc['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
