"""Tiny Qwen3 models, a character-level tokenizer, data sets and TRL configs for the tests of
the TRL integration (test_integrations_trl.py and the FSDP2 worker): built in code, nothing is
downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from trl.experimental import gkd, sdft  # noqa: E402

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!+-=\n")
SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
VOCAB = 64  # > len(SPECIALS + CHARS): the head has unused rows, as real ones often do
GKD_EXAMPLES = [("what is 2+2?", "it is 4."), ("hi", "hello there, friend."),
                ("name a fruit", "a pear")]
SDFT_EXAMPLES = [("what is 2+2?", "the answer is 4."), ("hi", "say hello"),
                 ("name a fruit", "apple, pear")]


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                               eos_token="<eos>", unk_token="<unk>",
                                               bos_token="<bos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    return tok


def tiny_model(seed: int, **config: object) -> nn.Module:
    # initializer_range 0.3: peaked, distinct distributions (the default gives near-uniform ones)
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.3,
        pad_token_id=0, eos_token_id=1, bos_token_id=3, **config)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(cfg).float()


def perturb(model: nn.Module, seed: int) -> None:
    """Move the student away from the weights its (base) teacher starts from."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def padded(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([f + r if side == "left" else r + f for r, f in zip(rows, fill,
                                                                              strict=True)])


def gkd_config(tmp: os.PathLike, **overrides: object) -> gkd.GKDConfig:
    # bf16=False: the parity tests compare in fp32 (transformers turns bf16 autocast on by
    # default where the CPU supports it)
    # activation_checkpointing: TRL's default (on), under the name transformers 5 keeps
    options = dict(output_dir=str(tmp), report_to="none", use_cpu=True, bf16=False,
                   activation_checkpointing=True,
                   per_device_train_batch_size=3, max_steps=1, save_strategy="no",
                   beta=0.5, temperature=0.7, lmbda=0.0, max_new_tokens=4, max_length=64)
    options.update(overrides)
    return gkd.GKDConfig(**options)


def gkd_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in GKD_EXAMPLES])


def sdft_config(tmp: os.PathLike, **overrides: object) -> sdft.SDFTConfig:
    options = dict(output_dir=str(tmp), report_to="none", use_cpu=True, bf16=False,
                   activation_checkpointing=True,
                   per_device_train_batch_size=2, num_generations=2, max_steps=1,
                   save_strategy="no", max_completion_length=6, temperature=0.7,
                   distillation_topk=8, teacher_model_kind="base")
    options.update(overrides)
    return sdft.SDFTConfig(**options)


def sdft_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": q, "privileged_context": c}
                                       for q, c in SDFT_EXAMPLES])


def sdft_batch(trainer, lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Student prompts (left-padded) and completions of the given lengths (right-padded; 0 = an
    empty completion) with TRL's own teacher prompts (prompt + privileged context)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [q for q, _ in SDFT_EXAMPLES]
    contexts = [c for _, c in SDFT_EXAMPLES]
    pad = trainer._tokenizer.pad_token_id
    prompt_rows = trainer._tokenize_prompts(prompts)
    completions = [torch.randint(4, len(SPECIALS + CHARS), (n,), generator=gen).tolist()
                   for n in lengths]
    batch = {
        "prompt_ids": padded(prompt_rows, pad, "left"),
        "prompt_mask": padded([[1] * len(r) for r in prompt_rows], 0, "left"),
        "completion_ids": padded(completions, pad, "right"),
        "completion_mask": padded([[1] * len(r) for r in completions], 0, "right"),
    }
    batch.update(trainer.teacher_context_builder.build(
        prompts, contexts, batch["completion_ids"], batch["completion_mask"]))
    return batch
