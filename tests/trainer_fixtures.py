"""Small models, tokenizers and problems for the trainer tests (built in code, no downloads)."""

from __future__ import annotations

import contextlib
import os
import random
import zlib
from collections.abc import Iterator

import torch

from opsd_kernels.trainer import OPSDConfig
from opsd_kernels.trainer.tiny import arithmetic_problems, tiny_model, tiny_tokenizer

# Short templates keep the sequences (and the tests) small; the head "Q: {problem}\n" is shared.
TEMPLATES = {"student_template": "Q: {problem}\nA: ",
             "teacher_template": "Q: {problem}\nRef: {solution}\nA: "}


def small_config(tmp_path, **overrides) -> OPSDConfig:
    values = {"model": "tiny", "device": "cpu", "output_dir": str(tmp_path / "run"),
              "max_prompt_length": 160, "max_new_tokens": 24, "num_rollouts": 3,
              "problems_per_step": 2, "max_steps": 3, "learning_rate": 1e-2, "resume": False,
              "progress_bar": False, "seed": 0, **TEMPLATES}
    return OPSDConfig.from_dict({**values, **overrides})


def small_model(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **config):
    """A 2-layer model whose random weights are large enough that its two prompts give clearly
    different next-token distributions (the default init gives near-uniform ones); ``config``
    overrides Qwen3Config fields (tie_word_embeddings=False: a separate lm_head)."""
    tokenizer = tokenizer or tiny_tokenizer()
    model = tiny_model(tokenizer, hidden_size=32, layers=2, seed=seed, max_positions=256,
                       initializer_range=0.3, **config)
    return model.to(dtype), tokenizer


def problems(count: int = 12, seed: int = 0) -> list[dict[str, str]]:
    return arithmetic_problems(count, seed=seed)


def random_responses(vocab: int, eos: int, count: int, seed: int) -> list[list[int]]:
    """Ragged responses of real token ids (some ending with eos), never empty."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        body = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]
        out.append(body + [eos] if rng.random() < 0.5 else body)
    return out


class FixedResponses:
    """A rollout engine whose responses depend only on the prompt and the sample's index, so
    runs over different numbers of processes train on the same data."""

    def __init__(self, vocab: int, eos: int, seed: int = 0) -> None:
        self.vocab, self.eos, self.seed = vocab, eos, seed

    def generate(self, prompts, params) -> list[list[int]]:
        out = []
        for prompt in prompts:
            key = zlib.crc32(str(list(prompt)).encode())
            for k in range(params.num_samples):
                rng = random.Random(key * 1009 + k * 31 + self.seed)
                body = [rng.randrange(3, self.vocab) for _ in range(rng.randint(1, 9))]
                out.append(body + [self.eos] if rng.random() < 0.5 else body)
        return out


@contextlib.contextmanager
def mixed_precision(mode: str) -> Iterator[None]:
    """Accelerators built inside run under ``mode`` ("bf16": autocast on CPU), as under
    ``accelerate launch --mixed_precision``. accelerate keeps its state across Accelerators, so
    it is reset on the way in and out."""
    from accelerate.state import AcceleratorState

    saved = os.environ.get("ACCELERATE_MIXED_PRECISION")
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_MIXED_PRECISION"] = mode
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        if saved is None:
            del os.environ["ACCELERATE_MIXED_PRECISION"]
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = saved
