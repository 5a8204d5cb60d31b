"""`OPSDTrainer`: sample rollouts from the student, score them under the teacher prompt, step
on the fused divergence. One process, or many under torchrun / accelerate (DDP, FSDP), through
`accelerate.Accelerator`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from opsd_kernels.trainer.answers import is_correct
from opsd_kernels.trainer.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_model,
)
from opsd_kernels.trainer.config import OPSDConfig
from opsd_kernels.trainer.data import Problem, load_problems
from opsd_kernels.trainer.metrics import MetricsLogger, peak_memory_mib
from opsd_kernels.trainer.models import check_model, prepare_model
from opsd_kernels.trainer.objective import DistillationObjective, RolloutBatch
from opsd_kernels.trainer.prompts import EncodedProblem, PromptEncoder
from opsd_kernels.trainer.rollouts import HFGenerateEngine, RolloutEngine, SamplingParams
from opsd_kernels.trainer.teacher import Teacher

Dataset = str | Path | Iterable[Mapping[str, Any]]


class OPSDTrainer:
    """On-policy self-distillation (or, with ``config.method = "sft"``, the supervised
    baseline on the same data and loop) of a Hugging Face causal LM.

    Args:
        model: a transformers *ForCausalLM (LoRA is added here when ``config.lora``).
        tokenizer: its tokenizer (needs an eos token).
        train_dataset: path (.jsonl / .parquet / `datasets` directory), `datasets.Dataset` or
            rows with the config's problem / solution (/ answer) columns.
        config: the run's `OPSDConfig`.
        eval_dataset: held-out problems for `evaluate()`.
        rollout_engine: samples the student's responses; default `HFGenerateEngine`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, train_dataset: Dataset,
                 config: OPSDConfig, eval_dataset: Dataset | None = None,
                 rollout_engine: RolloutEngine | None = None) -> None:
        from accelerate import Accelerator

        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer, config)
        self.train_problems, report = self.encode(train_dataset)
        self.eval_problems = None if eval_dataset is None else self.encode(eval_dataset)[0]
        check_model(model, config)
        self.accelerator = Accelerator(cpu=config.device == "cpu")
        if config.teacher_mode == "ema" and self.accelerator.distributed_type == "FSDP":
            raise ValueError("config.teacher_mode: 'ema' swaps whole parameters in for the "
                             "teacher, which FSDP's shards do not allow; use 'fixed' (LoRA) "
                             "or 'current' under FSDP")
        self.is_main = self.accelerator.is_main_process
        self._print(f"train data: {report}")
        model = prepare_model(model, config)
        self.model = model
        self.teacher = Teacher(config.teacher_mode, model, config.ema_decay)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id)
        self.pad_token_id = pad
        self.objective = DistillationObjective(model, self.teacher, config, pad)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(config.lr_scheduler, self.optimizer,
                                       num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.max_steps)
        self.objective, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.objective, self.optimizer, self.scheduler)
        self.params = params
        self.engine = rollout_engine or HFGenerateEngine(model, pad, tokenizer.eos_token_id)
        self.output_dir = Path(config.output_dir)
        self.metrics = MetricsLogger(self.output_dir, enabled=self.is_main,
                                     tensorboard=config.tensorboard)
        self.step = 0
        self._order: dict[int, list[int]] = {}

    # --- data ----------------------------------------------------------------------------

    def encode(self, dataset: Dataset) -> tuple[list[EncodedProblem], Any]:
        """Problems of ``dataset`` as prompt ids under this trainer's config, and a report of
        what was truncated or skipped."""
        c = self.config
        problems = dataset if _is_problems(dataset) else load_problems(
            dataset, problem_column=c.problem_column, solution_column=c.solution_column,
            answer_column=c.answer_column)
        return self.encoder.encode_all(problems)

    def _problems_for(self, step: int, micro: int) -> list[EncodedProblem]:
        """This process's problems for one micro-batch: a fixed function of (seed, step), so a
        resumed run reads the data where the interrupted one stopped."""
        c, acc = self.config, self.accelerator
        per_step = c.problems_per_step * c.gradient_accumulation_steps * acc.num_processes
        start = step * per_step + (micro * acc.num_processes + acc.process_index) * (
            c.problems_per_step)
        n = len(self.train_problems)
        out = []
        for k in range(start, start + c.problems_per_step):
            epoch, i = divmod(k, n)
            if epoch not in self._order:  # one shuffle per epoch, seeded by it
                generator = torch.Generator().manual_seed(c.seed + epoch)
                self._order = {epoch: torch.randperm(n, generator=generator).tolist()}
            out.append(self.train_problems[self._order[epoch][i]])
        return out

    def _rollouts(self, problems: list[EncodedProblem]) -> RolloutBatch:
        c = self.config
        if c.method == "sft":
            if c.sft_teacher_prompts:  # the same targets under the teacher prompts too
                problems = problems + [replace(p, student=p.teacher) for p in problems]
            return RolloutBatch(problems, [p.target for p in problems],
                                list(range(len(problems))))
        params = SamplingParams(c.num_rollouts, c.rollout_temperature, c.rollout_top_p,
                                c.rollout_top_k, c.max_new_tokens)
        responses = self.engine.generate([p.student for p in problems], params)
        groups = [g for g in range(len(problems)) for _ in range(c.num_rollouts)]
        if len(responses) != len(groups) or not all(responses):
            raise RuntimeError(f"rollout engine: expected {len(groups)} non-empty responses, "
                               f"got {len(responses)}")
        if self.pad_token_id != self.tokenizer.eos_token_id and any(
                r[0] == self.pad_token_id for r in responses):
            raise RuntimeError(f"rollout engine: a response starts with the pad token "
                               f"{self.pad_token_id}; suppress it when sampling")
        return RolloutBatch(problems, responses, groups)

    # --- training ------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run to ``config.max_steps`` (resuming from the latest checkpoint when
        ``config.resume``); save the final model to ``output_dir/final``. Returns the logged
        metrics of the steps run here."""
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if c.resume and (found := list_checkpoints(self.output_dir)):
            self.resume_from(found[-1])
        self.metrics.truncate_after(self.step)  # a fresh run starts a fresh file
        from tqdm.auto import tqdm

        bar = tqdm(total=c.max_steps, initial=self.step, desc=c.method,
                   disable=not (self.is_main and c.progress_bar))
        history = []
        while self.step < c.max_steps:
            record = self.train_step()
            history.append(record)
            if self.step % c.logging_steps == 0 or self.step == c.max_steps:
                self.metrics.log(self.step, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.eval_problems is not None and c.eval_steps and self.step % c.eval_steps == 0:
                self.metrics.log(self.step, self.evaluate())
            if c.save_steps and self.step % c.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.save(self.output_dir / "final")
        if self.eval_problems is not None and not c.eval_steps:
            self.metrics.log(self.step, self.evaluate())
        self.metrics.close()
        return history

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        c, acc = self.config, self.accelerator
        started = time.perf_counter()
        # Sampling depends on (seed, step, rank) only: resuming needs no saved RNG state.
        torch.manual_seed(c.seed * 1_000_003 + self.step * acc.num_processes + acc.process_index)
        batches = [self._rollouts(self._problems_for(self.step, m))
                   for m in range(c.gradient_accumulation_steps)]
        rollout_time = time.perf_counter() - started
        device = acc.device
        num_items = acc.reduce(torch.tensor(float(sum(b.num_tokens for b in batches)),
                                            device=device), reduction="sum")
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.objective):
                loss, sums = self.objective(batch, num_items)
                # DDP averages gradients over processes; num_items is already global.
                acc.backward(loss * acc.num_processes)
            sums["loss"] = loss.detach()
            for key, value in sums.items():
                totals[key] = totals.get(key, 0) + value.float()
        if c.method == "opsd":
            totals["correct"], totals["responses"] = self._accuracy_counts(batches, device)
        grad_norm = None
        if c.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self.params, c.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.update()
        self.step += 1
        keys = sorted(totals)
        reduced = dict(zip(keys, acc.reduce(torch.stack([totals[k] for k in keys]),
                                            reduction="sum").tolist(), strict=True))
        elapsed = time.perf_counter() - started
        tokens = reduced["tokens"]
        record = {"loss": reduced["loss"], "learning_rate": self.scheduler.get_last_lr()[0],
                  "response_length": tokens / (sum(len(b.responses) for b in batches)
                                               * acc.num_processes),
                  "tokens_per_s": tokens / elapsed, "rollout_s": rollout_time,
                  "step_s": elapsed, "peak_memory_mib": peak_memory_mib(device)}
        for key in ("divergence", "student_entropy", "teacher_entropy"):
            if key in reduced:
                record[key] = reduced[key] / tokens
        if "correct" in reduced:
            record["accuracy"] = reduced["correct"] / reduced["responses"]
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    def _accuracy_counts(self, batches: list[RolloutBatch],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        correct = sum(self._correct(b.responses, [b.problems[g].answer for g in b.group_index])
                      for b in batches)
        total = sum(len(b.responses) for b in batches)
        return (torch.tensor(float(correct), device=device),
                torch.tensor(float(total), device=device))

    def _correct(self, responses: list[list[int]], answers: list[str | None]) -> int:
        """How many decoded responses end in the matching boxed answer."""
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return sum(is_correct(t, a) for t, a in zip(texts, answers, strict=True))

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self, problems: list[EncodedProblem] | None = None,
                 prompt: Literal["student", "teacher"] = "student", *, num_samples: int = 1,
                 temperature: float = 0.0) -> dict[str, float]:
        """Answer accuracy and response length on the eval problems (split across processes):
        greedy by default, else the mean over ``num_samples`` samples at ``temperature``; under
        the student prompt, or the teacher's (what the teacher would answer)."""
        problems = problems if problems is not None else self.eval_problems
        if not problems:
            raise ValueError("evaluate: no eval problems (pass eval_dataset)")
        acc = self.accelerator
        mine = problems[acc.process_index::acc.num_processes]
        c = self.config
        params = SamplingParams(num_samples, temperature, c.rollout_top_p, c.rollout_top_k,
                                c.eval_max_new_tokens or c.max_new_tokens)
        prompts = [p.student if prompt == "student" else p.teacher for p in mine]
        responses = self.engine.generate(prompts, params) if mine else []
        correct = self._correct(responses, [p.answer for p in mine for _ in range(num_samples)])
        counts = torch.tensor([float(correct), float(len(responses)),
                               float(sum(len(r) for r in responses))], device=acc.device)
        correct, total, tokens = acc.reduce(counts, reduction="sum").tolist()
        return {"eval_accuracy": correct / total, "eval_response_length": tokens / total,
                "eval_problems": int(total) // num_samples}

    # --- saving --------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """The model (or LoRA adapter) and tokenizer in Hugging Face format."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_model(self.accelerator.unwrap_model(self.objective).model, self.tokenizer,
                       Path(directory))
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        self.accelerator.wait_for_everyone()
        path = self.output_dir / f"checkpoint-{self.step}"
        if self.is_main:
            save_checkpoint(self.output_dir, model=self.model, tokenizer=self.tokenizer,
                            optimizer=self.optimizer, scheduler=self.scheduler,
                            teacher_state=self.teacher.state_dict(), step=self.step)
        self.accelerator.wait_for_everyone()
        return path

    def resume_from(self, path: str | Path) -> None:
        step, teacher_state = load_checkpoint(Path(path), model=self.model,
                                              optimizer=self.optimizer, scheduler=self.scheduler)
        self.teacher.load_state_dict(teacher_state)
        self.step = step
        self._print(f"resumed from {path} at step {step}")

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def _is_problems(dataset: Any) -> bool:
    return isinstance(dataset, list) and bool(dataset) and isinstance(dataset[0], Problem)



