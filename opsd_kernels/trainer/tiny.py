"""The embedded default: a character-level tokenizer (built with `tokenizers`), a small
Qwen3-shaped model built from a config (random weights), and a synthetic arithmetic data set
with step-by-step reference solutions. Nothing is downloaded."""

from __future__ import annotations

import random
import string
from typing import Any

SPECIALS = ("<pad>", "<unk>", "<eos>")
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def tiny_tokenizer() -> Any:
    """One token per character of `CHARACTERS`, plus pad / unk / eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIALS, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                   unk_token="<unk>", eos_token="<eos>")


def tiny_model(tokenizer: Any, *, hidden_size: int = 128, layers: int = 4, seed: int = 0,
               max_positions: int = 2048, **config: Any) -> Any:
    """A randomly initialised Qwen3ForCausalLM (GQA, rotary, tied embeddings); ``config``
    overrides Qwen3Config fields. Its 2048 positions fit OPSDConfig's default prompt and
    response lengths, so `opsd train` runs on it with the defaults."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{
        "vocab_size": len(tokenizer), "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden_size // 4,
        "max_position_embeddings": max_positions, "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None, **config})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _solution(a: int, b: int) -> str:
    """Column addition, ones first, the carry written into the next column: 47+85 ->
    "7+5=12, 4+8+1=13, \\boxed{132}"."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={total}")
        carry = total // 10
    return ", ".join(steps) + f", \\boxed{{{a + b}}}"


def arithmetic_problems(count: int, seed: int, digits: int = 2) -> list[dict[str, str]]:
    """Rows with problem / solution / answer columns: sums of two ``digits``-digit numbers."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    rows = []
    for _ in range(count):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        rows.append({"problem": f"What is {a}+{b}?", "solution": _solution(a, b),
                     "answer": str(a + b)})
    return rows
