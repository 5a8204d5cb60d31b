"""Evaluation as a free function: answer accuracy of a model on held-out problems (greedy, or
sampled), and `opsd eval` on a config and a checkpoint. No optimizer, scheduler or trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from opsd_kernels.trainer.answers import count_correct
from opsd_kernels.trainer.checkpoint import load_model_weights
from opsd_kernels.trainer.config import OPSDConfig
from opsd_kernels.trainer.prompts import EncodedProblem
from opsd_kernels.trainer.rollouts import (
    HFGenerateEngine,
    InForwardEngine,
    RolloutEngine,
    SamplingParams,
)


def evaluate(model: nn.Module, tokenizer: Any, problems: list[EncodedProblem],
             config: OPSDConfig, *, engine: RolloutEngine | None = None,
             accelerator: Any = None, prompt: Literal["student", "teacher"] = "student",
             num_samples: int = 1, temperature: float = 0.0) -> dict[str, float]:
    """Answer accuracy and response length on ``problems``: greedy by default, else the mean
    over ``num_samples`` samples at ``temperature``; under the student prompt, or the teacher's
    (what the teacher would answer). ``eval_accuracy`` grades as the config says
    (``grade_unboxed``); ``eval_accuracy_boxed`` / ``_unboxed`` give both graders. With an
    ``accelerator``, the problems are split across its processes and the counts summed."""
    if not problems:
        raise ValueError("evaluate: no eval problems (set eval_data)")
    if engine is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id)
        engine = HFGenerateEngine(model, pad, tokenizer.eos_token_id, share_prompts=True)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index,
                                                      accelerator.num_processes)
    mine = problems[rank::world]
    params = SamplingParams(num_samples, temperature, config.rollout_top_p, config.rollout_top_k,
                            config.eval_max_new_tokens or config.max_new_tokens)
    prompts = [p.student if prompt == "student" else p.teacher for p in mine]
    # An engine on sharded weights needs every process in each call, with prompts or none.
    joins = bool(mine) or isinstance(engine, InForwardEngine)
    responses = engine.generate(prompts, params) if joins else []
    answers = [p.answer for p in mine for _ in range(num_samples)]
    boxed = count_correct(tokenizer, responses, answers)
    unboxed = count_correct(tokenizer, responses, answers, unboxed=True)
    counts = torch.tensor([float(boxed), float(unboxed), float(len(responses)),
                           float(sum(len(r) for r in responses))])
    if accelerator is not None:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    boxed, unboxed, total, tokens = counts.tolist()
    return {"eval_accuracy": (unboxed if config.grade_unboxed else boxed) / total,
            "eval_accuracy_boxed": boxed / total, "eval_accuracy_unboxed": unboxed / total,
            "eval_response_length": tokens / total, "eval_problems": int(total) // num_samples}


def evaluate_checkpoint(config: OPSDConfig, checkpoint: str | Path | None = None,
                        ) -> dict[str, float]:
    """Greedy accuracy on ``config.eval_data`` of ``config.model`` (LoRA added per the config),
    with the weights of ``checkpoint`` (a run's checkpoints/checkpoint_N or final directory)
    when given."""
    from opsd_kernels.trainer.data import load_data
    from opsd_kernels.trainer.models import check_model, load_model_and_tokenizer, prepare_model
    from opsd_kernels.trainer.prompts import PromptEncoder

    if config.eval_data is None:
        raise ValueError("config.eval_data: required for opsd eval (--eval_data FILE)")
    model, tokenizer = load_model_and_tokenizer(config)
    check_model(model, config)
    problems, report = PromptEncoder(tokenizer, config).encode_all(
        load_data(config.eval_data, config, "eval"))
    print(f"eval data: {report}", flush=True)
    model = prepare_model(model, config)
    if checkpoint is not None:
        load_model_weights(model, Path(checkpoint))
    return evaluate(model, tokenizer, problems, config)
