"""`OPSDTrainer`: sample rollouts from the student, score them under the teacher prompt, step
on the fused divergence. One process, or several through `accelerate.Accelerator`: DDP under
torchrun, FSDP2 under ``accelerate launch`` with ``fsdp_version: 2``, DeepSpeed ZeRO-2 and ZeRO-3
with configs/zero2.yaml and zero3.yaml (`opsd_kernels.trainer.zero` drives the engine); all
tested with 2 CPU processes on gloo. `opsd_kernels.sharding` gathers the sharded lm_head for the
loss; under FSDP2 and ZeRO-3 rollouts and evaluation run inside the root's / engine's forward on
every process at once (`InForwardEngine`), the EMA teacher lives in each process's shards, and
the Hugging Face copies are gathered onto rank 0. bf16 (accelerate's ``mixed_precision``) is
tested under FSDP2, ZeRO-2 and ZeRO-3 against one process; checkpoints resume on another number
of processes under each (`checkpoint.check_layout`, `zero.as_universal`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from opsd_kernels import sharding
from opsd_kernels.trainer import checkpoint, zero
from opsd_kernels.trainer.answers import correct_flags, group_advantages
from opsd_kernels.trainer.config import OPSDConfig
from opsd_kernels.trainer.data import Problem, load_data
from opsd_kernels.trainer.evaluate import evaluate
from opsd_kernels.trainer.metrics import peak_memory_mib, trackers
from opsd_kernels.trainer.models import check_model, prepare_model
from opsd_kernels.trainer.nonfinite import NonFiniteSteps, TrainingStopped
from opsd_kernels.trainer.objective import DistillationObjective, RolloutBatch
from opsd_kernels.trainer.prompts import EncodedProblem, PromptEncoder
from opsd_kernels.trainer.rollouts import (
    HFGenerateEngine,
    InForwardEngine,
    RolloutEngine,
    SamplingParams,
)
from opsd_kernels.trainer.teacher import Teacher

__all__ = ["OPSDTrainer", "TrainingStopped"]

Dataset = str | Path | Iterable[Mapping[str, Any]]


class OPSDTrainer:
    """On-policy self-distillation of a Hugging Face causal LM; with ``config.method`` "sft"
    or "grpo", the supervised and the RL baselines on the same data, loop and rollout engine.

    Args:
        model: a transformers *ForCausalLM (LoRA is added here when ``config.lora``).
        tokenizer: its tokenizer (needs an eos token).
        train_dataset: path (.jsonl / .parquet / `datasets` directory), `datasets.Dataset`,
            rows with the config's problem / solution (/ answer) columns, or the
            ``train_problems`` of another trainer with the same prompts (not encoded again).
        config: the run's `OPSDConfig`.
        eval_dataset: held-out problems for `evaluate()`.
        rollout_engine: samples the student's responses; default `HFGenerateEngine`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, train_dataset: Dataset,
                 config: OPSDConfig, eval_dataset: Dataset | None = None,
                 rollout_engine: RolloutEngine | None = None) -> None:
        from accelerate import Accelerator

        config.validate()
        check_model(model, config)  # before the data: a config the model cannot run fails fast
        self.config = config
        self.tokenizer = tokenizer
        self.output_dir = Path(config.output_dir)
        log_with = trackers(self.output_dir, tensorboard=config.tensorboard)
        self.metrics_file = log_with[0]  # metrics.jsonl
        self.accelerator = Accelerator(
            cpu=config.device == "cpu", log_with=log_with,
            project_config=checkpoint.project_configuration(self.output_dir,
                                                            config.save_total_limit))
        _check_distributed(self.accelerator)
        if zero.is_deepspeed(self.accelerator):
            zero.configure(self.accelerator, config)
        self.is_main = self.accelerator.is_main_process
        self.encoder = PromptEncoder(tokenizer, config)
        self.train_problems = self._encoded(train_dataset, "train")
        self.eval_problems = None if eval_dataset is None else self._encoded(eval_dataset,
                                                                              "eval")
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
        # FSDP2's preparation replaces each parameter by its shard: take them again.
        self.params = [p for p in model.parameters() if p.requires_grad]
        zero3 = zero.is_zero3(self.accelerator)
        self.teacher.reread_parameters(
            (lambda: zero.release_gathered(self.accelerator)) if zero3 else None)
        self.engine = rollout_engine or HFGenerateEngine(model, pad, tokenizer.eos_token_id,
                                                          share_prompts=True)
        if sharding.is_fsdp_unit(self.objective):  # FSDP2: generate inside the root's forward
            self.engine = InForwardEngine(self.engine, self.objective)
        elif zero3:  # inside the engine's forward, whose hooks gather the partitions
            self.engine = InForwardEngine(self.engine, self.objective,
                                          self.accelerator.unwrap_model(self.objective))
        self.progress = checkpoint.Progress(checkpoint.layout(self.accelerator))
        self._checkpointed = (self.progress, self.teacher)
        self.accelerator.register_for_checkpointing(*self._checkpointed)
        checkpoint.use_hugging_face_format(
            self.accelerator, lambda: self.accelerator.unwrap_model(self.objective).model,
            tokenizer)
        self.nonfinite = NonFiniteSteps(config.max_nonfinite_steps)
        self.eval_results: dict[str, float] | None = None
        self._order: dict[int, list[int]] = {}

    @property
    def step(self) -> int:
        """Optimizer steps taken (skipped non-finite steps included)."""
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    # --- data ----------------------------------------------------------------------------

    def _encoded(self, dataset: Dataset, split: str) -> list[EncodedProblem]:
        if isinstance(dataset, list) and dataset and isinstance(dataset[0], EncodedProblem):
            return dataset
        problems, report = self.encode(dataset, split)
        self._print(f"{split} data: {report}")
        return problems

    def encode(self, dataset: Dataset, split: Literal["train", "eval"] = "eval",
               ) -> tuple[list[EncodedProblem], Any]:
        """Problems of ``dataset`` (a task gives its ``split``) as prompt ids under this
        trainer's config, and a report of what was truncated or skipped."""
        problems = dataset if _is_problems(dataset) else load_data(dataset, self.config, split)
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
        rewards = correct_flags(self.tokenizer, responses, [problems[g].answer for g in groups],
                                unboxed=c.grade_unboxed)
        advantages = group_advantages(rewards, c.num_rollouts) if c.method == "grpo" else None
        return RolloutBatch(problems, responses, groups, advantages, rewards)

    def _targets(self, batch: RolloutBatch) -> RolloutBatch | None:
        """The reference solutions of a batch's problems, for opsd's ``sft_loss_weight``."""
        if self.config.sft_loss_weight == 0:
            return None
        problems = batch.problems
        return RolloutBatch(problems, [p.target for p in problems], list(range(len(problems))))

    # --- training ------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run to ``config.max_steps`` (resuming from the latest checkpoint when
        ``config.resume``); save the final model to ``output_dir/final``. Returns the logged
        metrics of the steps run here; the final evaluation is kept in ``eval_results``."""
        c, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not acc.trackers:
            acc.init_trackers("tensorboard")  # TensorBoard's run folder under output_dir
        if c.resume and (found := checkpoint.latest_checkpoint(self.output_dir,
                                                                len(self._checkpointed))):
            self.resume_from(found)
        self.metrics_file.truncate_after(self.step)
        from tqdm.auto import tqdm

        show_bar = self.is_main and c.progress_bar
        bar = tqdm(total=c.max_steps, initial=self.step, desc=c.method, disable=not show_bar)
        history = []
        while self.step < c.max_steps:
            record = self.train_step()
            history.append(record)
            if self.step % c.logging_steps == 0 or self.step == c.max_steps:
                acc.log(record, step=self.step)
                if not show_bar:
                    self._print(_one_line(self.step, c.max_steps, record))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.eval_problems is not None and c.eval_steps and self.step % c.eval_steps == 0:
                self.eval_results = self.evaluate()
                acc.log(self.eval_results, step=self.step)
            if c.save_steps and self.step % c.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.save(self.output_dir / "final")
        if self.eval_problems is not None and not c.eval_steps:
            self.eval_results = self.evaluate()
            acc.log(self.eval_results, step=self.step)
        for tracker in acc.trackers:  # not end_training(): it ends the process group too, which
            tracker.finish()  # belongs to the caller (evaluation, saving may follow)
        return history

    def summary(self, history: list[dict[str, float]]) -> str:
        """What a run did and where its outputs are, for the end of `opsd train`."""
        lines = [f"opsd train: {self.step} of {self.config.max_steps} steps ({self.config.method})"]
        if history:
            lines[0] += f"; final loss {history[-1]['loss']:.4f}"
        if self.eval_results is not None:
            lines.append(f"  eval accuracy {self.eval_results['eval_accuracy']:.1%} on "
                         f"{self.eval_results['eval_problems']} problems (greedy)")
        found = sorted((self.output_dir / checkpoint.CHECKPOINTS).glob("checkpoint_*"))
        lines += [f"  model:       {self.output_dir / 'final'}",
                  f"  metrics:     {self.output_dir / 'metrics.jsonl'}",
                  f"  checkpoints: {len(found)} in {self.output_dir / checkpoint.CHECKPOINTS}"]
        return "\n".join(lines)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        c, acc = self.config, self.accelerator
        started = time.perf_counter()
        # Sampling depends on (seed, step, rank) only: resuming needs no saved RNG state.
        torch.manual_seed(c.seed * 1_000_003 + self.step * acc.num_processes + acc.process_index)
        batches = [self._rollouts(self._problems_for(self.step, m))
                   for m in range(c.gradient_accumulation_steps)]
        targets = [self._targets(b) for b in batches]
        rollout_time = time.perf_counter() - started
        device = acc.device
        num_items, num_target_items = acc.reduce(torch.tensor(
            [float(sum(b.num_tokens for b in batches)),
             float(sum(t.num_tokens for t in targets if t is not None))], device=device),
            reduction="sum").unbind()
        totals: dict[str, torch.Tensor] = {}
        deepspeed = zero.is_deepspeed(acc)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if deepspeed:  # the engine accumulates and reduces by its boundary flag
                loss, sums = self.objective(batch, num_items, targets[i], num_target_items)
                zero.backward(acc, loss, last)
            else:
                with contextlib.nullcontext() if last else acc.no_sync(self.objective):
                    loss, sums = self.objective(batch, num_items, targets[i], num_target_items)
                    # DDP averages gradients over processes; num_items is already global.
                    acc.backward(loss * acc.num_processes)
            sums["loss"] = loss.detach()
            for key, value in sums.items():
                totals[key] = totals.get(key, 0) + value.float()
        if c.method != "sft":
            totals["correct"] = torch.tensor(float(sum(sum(b.rewards) for b in batches)),
                                             device=device)
            totals["responses"] = torch.tensor(float(sum(len(b.responses) for b in batches)),
                                               device=device)
        keys = sorted(totals)
        reduced = dict(zip(keys, acc.reduce(torch.stack([totals[k] for k in keys]),
                                            reduction="sum").tolist(), strict=True))
        if deepspeed:  # the engine clips, steps and skips a non-finite norm's update itself
            grad_norm, stepped = zero.step(acc)
            applied = self.nonfinite.allow(self.step + 1, reduced["loss"], grad_norm)
            if applied:
                self.scheduler.step()
        else:
            # The norm is measured every step (an infinite limit clips nothing) to catch NaN/Inf.
            limit = math.inf if c.max_grad_norm is None else c.max_grad_norm
            grad_norm = float(acc.clip_grad_norm_(self.params, limit))
            applied = stepped = self.nonfinite.allow(self.step + 1, reduced["loss"], grad_norm)
            if applied:
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if applied:
            self.teacher.update()
        else:
            done = "update applied by DeepSpeed" if stepped else "update skipped"
            self._print(f"step {self.step + 1}: loss {reduced['loss']}, grad norm {grad_norm}: "
                        f"not finite, {done} ({self.nonfinite.in_a_row} in a row; "
                        f"training stops at {self.config.max_nonfinite_steps})")
        self.step += 1
        elapsed = time.perf_counter() - started
        tokens = reduced["tokens"]
        record = {"loss": reduced["loss"], "learning_rate": self.scheduler.get_last_lr()[0],
                  "response_length": tokens / (sum(len(b.responses) for b in batches)
                                               * acc.num_processes),
                  "tokens_per_s": tokens / elapsed, "rollout_s": rollout_time,
                  "step_s": elapsed, "peak_memory_mib": peak_memory_mib(device)}
        for key in ("divergence", "student_entropy", "teacher_entropy", "logprob"):
            if key in reduced:
                record[key] = reduced[key] / tokens
        if "sft_loss" in reduced:  # each micro-batch's share of the global mean
            record["sft_loss"] = reduced["sft_loss"] / acc.num_processes
        if "correct" in reduced:
            record["accuracy"] = reduced["correct"] / reduced["responses"]
        record["grad_norm"] = grad_norm
        if not applied:
            record["skipped"] = 1
        return record

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self, problems: list[EncodedProblem] | None = None,
                 prompt: Literal["student", "teacher"] = "student", *, num_samples: int = 1,
                 temperature: float = 0.0) -> dict[str, float]:
        """`opsd_kernels.trainer.evaluate.evaluate` on this trainer's model, engine and
        processes; ``problems`` default to the eval problems."""
        problems = problems if problems is not None else self.eval_problems
        if not problems:
            raise ValueError("evaluate: no eval problems (pass eval_dataset)")
        return evaluate(self.model, self.tokenizer, problems, self.config, engine=self.engine,
                        accelerator=self.accelerator, prompt=prompt, num_samples=num_samples,
                        temperature=temperature)

    # --- saving --------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """The model (or LoRA adapter) and tokenizer in Hugging Face format."""
        self.accelerator.wait_for_everyone()
        checkpoint.save_model(self.accelerator.unwrap_model(self.objective).model,
                              self.tokenizer, Path(directory), write=self.is_main)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, step and teacher, by accelerate's ``save_state``."""
        return checkpoint.save_checkpoint(self.accelerator, self.output_dir, self.step)

    def resume_from(self, path: str | Path) -> None:
        """Load a checkpoint of this run, on any number of processes: a sharded one (FSDP2,
        DeepSpeed) only under the sharding that saved it (`checkpoint.check_layout`); a ZeRO one
        from another number of processes through DeepSpeed's universal format
        (`zero.as_universal`)."""
        path = Path(path)
        if checkpoint.check_layout(path, self.progress.layout):  # ZeRO on another count
            with zero.as_universal(self.accelerator, path) as universal:
                self.accelerator.load_state(str(universal))
        else:
            self.accelerator.load_state(str(path))
        self._print(f"resumed from {path} at step {self.step}")

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def _check_distributed(accelerator: Any) -> None:
    """Refuse the sharded setups the trainer cannot run (it runs DDP, FSDP2, ZeRO-2 and ZeRO-3;
    `zero.configure` checks the DeepSpeed config), and fp16 outside DeepSpeed."""
    if accelerator.distributed_type == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("accelerate config: FSDP1 flattens each unit's parameters into one "
                         "buffer, where the fused loss cannot find the lm_head weight; set "
                         "fsdp_version: 2 (opsd_kernels/trainer/configs/fsdp2.yaml)")
    if accelerator.mixed_precision == "fp16" and not zero.is_deepspeed(accelerator):
        # accelerate's fp16 steps through a GradScaler, whose overflow steps the trainer would
        # skip itself (no scaler.update(): the scale never backs off and the next unscale_
        # fails); on CPU accelerate runs fp16 as fp32, without autocast or scaler.
        raise ValueError("mixed_precision: fp16 is not supported by OPSDTrainer outside "
                         "DeepSpeed (its non-finite step skipping bypasses the loss scaler); "
                         "use bf16")


def _is_problems(dataset: Any) -> bool:
    return isinstance(dataset, list) and bool(dataset) and isinstance(dataset[0], Problem)


def _one_line(step: int, max_steps: int, record: dict[str, float]) -> str:
    """A logged step when there is no progress bar."""
    shown = [f"{k} {record[k]:.4g}" for k in ("loss", "divergence", "accuracy", "grad_norm")
             if k in record]
    return f"step {step}/{max_steps}: " + ", ".join(shown)
