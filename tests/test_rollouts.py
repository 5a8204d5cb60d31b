"""HFGenerateEngine: prompts encoded once per sample or once in all give the same rollouts;
generate_kwargs reach `generate`."""

from __future__ import annotations

import pytest
import torch

from opsd_kernels.trainer.rollouts import HFGenerateEngine, SamplingParams
from opsd_kernels.trainer.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, hidden_size=64, layers=2, seed=0).eval(), tokenizer


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_shared_prompt_encoding_gives_the_same_rollouts(model_and_tokenizer, temperature) -> None:
    model, tok = model_and_tokenizer
    # Ragged lengths: left padding on all but the longest prompt.
    prompts = [tok(text).input_ids for text in ("12+7=", "3+4=", "100+250=", "9=")]
    params = SamplingParams(num_samples=3, temperature=temperature, max_new_tokens=12)
    out = {}
    for share in (False, True):
        engine = HFGenerateEngine(model, tok.pad_token_id, tok.eos_token_id, share_prompts=share)
        torch.manual_seed(5)
        out[share] = engine.generate(prompts, params)
    assert len(out[True]) == len(prompts) * params.num_samples
    assert out[True] == out[False]
    if temperature > 0:  # samples of one prompt differ: the cache copies are independent
        assert len({tuple(r) for r in out[True][:3]}) > 1


def test_one_token_prompts_fall_back_to_plain_generate(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    engine = HFGenerateEngine(model, tok.pad_token_id, tok.eos_token_id, share_prompts=True)
    prompts = [tok("7").input_ids[:1]] * 2
    torch.manual_seed(0)
    rows = engine.generate(prompts, SamplingParams(num_samples=2, temperature=1.0,
                                                   max_new_tokens=4))
    assert len(rows) == 4 and all(1 <= len(r) <= 4 for r in rows)


def test_generate_kwargs_reach_generate(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    prompts = [tok(text).input_ids for text in ("12+7=", "3+4=", "100+250=")]
    params = SamplingParams(num_samples=2, temperature=0.0, max_new_tokens=8)
    plain = HFGenerateEngine(model, tok.pad_token_id, tok.eos_token_id).generate(prompts, params)
    static = HFGenerateEngine(model, tok.pad_token_id, tok.eos_token_id,
                              generate_kwargs={"cache_implementation": "static"})
    assert static.generate(prompts, params) == plain  # a static cache: the same greedy tokens
    first = plain[0][0]  # banning the first greedy token changes the first answer
    banned = HFGenerateEngine(model, tok.pad_token_id, tok.eos_token_id,
                              generate_kwargs={"bad_words_ids": [[first]]})
    assert banned.generate(prompts, params)[0][0] != first


def test_generate_kwargs_the_engine_sets_are_refused(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match=r"generate_kwargs: \['max_new_tokens', 'top_k'\] are set"):
        HFGenerateEngine(model, tok.pad_token_id, tok.eos_token_id,
                         generate_kwargs={"top_k": 5, "max_new_tokens": 3, "num_beams": 1})
