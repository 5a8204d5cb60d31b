"""Shared-prefix forward for Hugging Face decoders (opsd_kernels.prefix).

The oracle is the model's own plain forward of each concatenated sequence
[prefix real tokens ; suffix real tokens], one row at a time (no padding, no mask). Outputs and
the gradients of every parameter from one scalar loss (real suffix positions + each prefix's
last hidden state) must match. The models are tiny random-init configs of each supported
architecture, with GQA and an init scale large enough that attention visibly moves the outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from opsd_kernels.prefix import (  # noqa: E402
    ATTENTION_NAME,
    PrefixState,
    check_prefix_model,
    extend_prefix,
    prefix_forward,
    shared_prefix_forward,
)

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
VOCAB, HIDDEN, PAD = 97, 32, 0
# Relative to the largest expected magnitude. fp64 is not exact: the models' RMSNorm runs in
# fp32 whatever the model dtype, so gradients carry fp32 rounding (~3e-8 measured).
TOL = {torch.float32: 1e-5, torch.float64: 5e-7}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a shared machine the spinning of idle
    intra-op threads made this file ~3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               **overrides) -> transformers.PreTrainedModel:
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2, pad_token_id=PAD, tie_word_embeddings=False,
                  attn_implementation="sdpa")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    if arch == "qwen3":
        common["head_dim"] = 16  # != hidden / heads, as in the real Qwen3 models
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**common, **overrides}))
    return model.to(dtype).train()


def enable_checkpointing(model: transformers.PreTrainedModel, reentrant: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 5.23 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@dataclass
class Batch:
    prefix_ids: torch.Tensor  # [G, P] right-padded with PAD
    prefix_lengths: torch.Tensor
    suffix_ids: torch.Tensor  # [B, R]
    suffix_lengths: torch.Tensor
    group_index: torch.Tensor


def _ragged_ids(gen: torch.Generator, lengths: torch.Tensor, width: int) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (lengths.shape[0], width), generator=gen)
    return ids.masked_fill(torch.arange(width)[None, :] >= lengths[:, None], PAD)


def make_batch(seed: int, n: int, groups: int = 2, width_p: int = 7,
               width_s: int = 6) -> Batch:
    """Ragged prefixes (the first one full width) and suffixes, n rows per group, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    p_len = torch.randint(2, width_p + 1, (groups,), generator=gen)
    p_len[0] = width_p
    rows = groups * n
    s_len = torch.randint(1, width_s + 1, (rows,), generator=gen)
    s_len[-1] = width_s
    group_index = torch.arange(groups).repeat_interleave(n)[torch.randperm(rows, generator=gen)]
    return Batch(_ragged_ids(gen, p_len, width_p), p_len, _ragged_ids(gen, s_len, width_s), s_len,
                 group_index)


def loss_weights(seed: int, batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + 1)
    rows, width = batch.suffix_ids.shape
    w_s = torch.randn(rows, width, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    w_s = w_s * (torch.arange(width)[None, :] < batch.suffix_lengths[:, None])[..., None]
    w_p = torch.randn(batch.prefix_ids.shape[0], HIDDEN, generator=gen, dtype=torch.float64)
    return w_s, w_p.to(dtype)


def param_grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def plain_rows(model, prefix_rows: list[torch.Tensor], suffix_rows: list[torch.Tensor]):
    """The oracle: hidden states of each [prefix ; suffix] at the suffix, one row at a time."""
    decoder = model.get_decoder()
    out = []
    for p, s in zip(prefix_rows, suffix_rows, strict=True):
        h = decoder(torch.cat([p, s])[None], use_cache=False).last_hidden_state[0]
        out.append(h[p.shape[0]:])
    return out


def plain_last(model, prefix_rows: list[torch.Tensor]) -> list[torch.Tensor]:
    decoder = model.get_decoder()
    return [decoder(p[None], use_cache=False).last_hidden_state[0, -1] for p in prefix_rows]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} vs {expected.dtype}"
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual, expected, atol=TOL[dtype] * scale, rtol=TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


def compare_grads(ours: dict, ref: dict, dtype: torch.dtype) -> None:
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(ours[name], ref[name], dtype, f"grad of {name}")


def _real_suffix(batch: Batch) -> list[torch.Tensor]:
    return [batch.suffix_ids[b, :batch.suffix_lengths[b]] for b in range(len(batch.suffix_ids))]


def _real_prefix(batch: Batch) -> list[torch.Tensor]:
    return [batch.prefix_ids[g, :batch.prefix_lengths[g]] for g in range(len(batch.prefix_ids))]


# --- equivalence with the plain forward --------------------------------------------------------


def _check_against_plain(model, batch, prefixes, out, ours_grads, w_s, w_p, dtype, what):
    """The oracle: each row [prefix ; suffix] run alone without padding; hidden states, prefix
    last hidden and every parameter gradient of the same weighted loss must agree."""
    rows = plain_rows(model, [prefixes[g] for g in batch.group_index], _real_suffix(batch))
    last = plain_last(model, prefixes)
    ref_loss = sum((h * w_s[b, :h.shape[0]]).sum() for b, h in enumerate(rows))
    ref_loss = ref_loss + sum((h * w_p[g]).sum() for g, h in enumerate(last))
    for b, h in enumerate(rows):
        assert_close(out.hidden_states[b, :h.shape[0]].detach(), h.detach(), dtype,
                     f"hidden states of row {b}")
    assert_close(out.prefix_last_hidden.detach(), torch.stack(last).detach(), dtype, what)
    compare_grads(ours_grads, param_grads(model, ref_loss), dtype)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_plain_forward(arch: str, dtype: torch.dtype, n: int,
                               checkpointing: bool) -> None:
    model = make_model(arch, dtype)
    if checkpointing:
        enable_checkpointing(model, reentrant=False)
    batch = make_batch(seed=n, n=n)
    w_s, w_p = loss_weights(n, batch, dtype)

    out = shared_prefix_forward(model, batch.prefix_ids, batch.suffix_ids, batch.group_index,
                                batch.prefix_lengths, batch.suffix_lengths)
    assert model.config._attn_implementation == "sdpa", "the attention choice was not restored"
    state = out.state
    head_dim = model.model.layers[0].self_attn.head_dim
    assert len(state.keys) == 2
    assert state.keys[0].shape == (2, 2, batch.prefix_ids.shape[1], head_dim)  # not repeated
    ours_grads = param_grads(model, (out.hidden_states * w_s).sum()
                             + (out.prefix_last_hidden * w_p).sum())

    _check_against_plain(model, batch, _real_prefix(batch), out, ours_grads, w_s, w_p, dtype,
                         "prefix last hidden")


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_within_the_flash_attention_rule(arch: str) -> None:
    """bf16: our error vs the fp64 plain forward is at most 2x (outputs) / 3x (gradients) the
    error of the plain bf16 forward, plus a small floor."""
    model = make_model(arch, torch.float64, seed=2)
    batch = make_batch(seed=7, n=3)
    w_s, w_p = loss_weights(7, batch, torch.float64)
    prefixes = _real_prefix(batch)

    def plain(dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
        rows = plain_rows(model, [prefixes[g] for g in batch.group_index], _real_suffix(batch))
        last = plain_last(model, prefixes)
        loss = sum((h * w_s[b, :h.shape[0]].to(dtype)).sum() for b, h in enumerate(rows))
        loss = loss + sum((h * w_p[g].to(dtype)).sum() for g, h in enumerate(last))
        return torch.cat([*rows, torch.stack(last)]).detach().double(), param_grads(model, loss)

    ref_out, ref_grads = plain(torch.float64)
    model.to(torch.bfloat16)
    base_out, base_grads = plain(torch.bfloat16)
    out = _call(model, batch)
    real = torch.arange(batch.suffix_ids.shape[1])[None] < batch.suffix_lengths[:, None]
    ours_out = torch.cat([out.hidden_states[real], out.prefix_last_hidden]).detach().double()
    ours_grads = param_grads(model, (out.hidden_states * w_s.bfloat16()).sum()
                             + (out.prefix_last_hidden * w_p.bfloat16()).sum())

    def check(ours: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, factor: float,
              what: str) -> None:
        err = (ours.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        floor = 1e-3 * ref.abs().max().item()
        assert err <= factor * base_err + floor, f"{what}: {err:.3e} vs plain bf16 {base_err:.3e}"

    check(ours_out, base_out, ref_out, 2.0, "hidden states")
    for name, ref in ref_grads.items():
        check(ours_grads[name], base_grads[name], ref, 3.0, f"grad of {name}")


def test_the_check_is_sensitive() -> None:
    """The test models are not so close to identity that a missing prefix would pass."""
    model = make_model("llama")
    batch = make_batch(seed=0, n=1)
    with torch.no_grad():
        out = shared_prefix_forward(model, batch.prefix_ids, batch.suffix_ids, batch.group_index,
                                    batch.prefix_lengths, batch.suffix_lengths)
        alone = model.get_decoder()(batch.suffix_ids[:1, :batch.suffix_lengths[0]])
    diff = (out.hidden_states[0, :batch.suffix_lengths[0]] - alone.last_hidden_state[0]).abs()
    assert diff.max() > 1e-2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_extension_matches_plain_forward(arch: str, checkpointing: bool) -> None:
    """[base ; extra ; suffix] (a teacher prompt = common head + teacher-only part), ragged at
    every level; gradients flow into the base pass when detach_base=False."""
    dtype = torch.float64
    model = make_model(arch, dtype, seed=1)
    if checkpointing:
        enable_checkpointing(model, reentrant=False)
    batch = make_batch(seed=5, n=3)
    gen = torch.Generator().manual_seed(9)
    e_len = torch.tensor([2, 5])
    extra_ids = _ragged_ids(gen, e_len, 5)
    w_s, w_p = loss_weights(5, batch, dtype)

    base = prefix_forward(model, batch.prefix_ids, batch.prefix_lengths)
    ext = extend_prefix(model, base, extra_ids, e_len, detach_base=False)
    assert torch.equal(ext.lengths, batch.prefix_lengths + e_len)
    assert ext.max_length == batch.prefix_ids.shape[1] + extra_ids.shape[1]
    out = shared_prefix_forward(model, ext, batch.suffix_ids, batch.group_index,
                                suffix_lengths=batch.suffix_lengths)
    assert out.state is ext
    ours_grads = param_grads(model, (out.hidden_states * w_s).sum()
                             + (out.prefix_last_hidden * w_p).sum())

    prefixes = [torch.cat([p, extra_ids[g, :e_len[g]]]) for g, p in enumerate(_real_prefix(batch))]
    _check_against_plain(model, batch, prefixes, out, ours_grads, w_s, w_p, dtype,
                         "extended prefix last hidden")


def test_extension_detached_base_gets_no_gradient() -> None:
    model = make_model("qwen3", torch.float64)
    batch = make_batch(seed=3, n=2)
    base = prefix_forward(model, batch.prefix_ids, batch.prefix_lengths)
    reached = []
    base.keys[0].register_hook(lambda g: reached.append(g))
    ext = extend_prefix(model, base, batch.prefix_ids[:, :3], detach_base=True)
    out = shared_prefix_forward(model, ext, batch.suffix_ids, batch.group_index,
                                suffix_lengths=batch.suffix_lengths)
    out.hidden_states.sum().backward()
    assert not reached
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None  # the extra part did


def test_checkpoint_recompute_leaves_the_state_alone() -> None:
    """The backward's recompute runs the attention function again; it must not rebind the
    state's tensors, which later suffix batches read."""
    model = make_model("llama", torch.float64)
    enable_checkpointing(model, reentrant=False)
    batch = make_batch(seed=6, n=2)
    out = _call(model, batch)
    keys = list(out.state.keys)
    out.hidden_states.sum().backward()
    assert all(a is b for a, b in zip(keys, out.state.keys, strict=True))


def test_state_is_reusable_and_no_grad_works() -> None:
    model = make_model("qwen2")
    batch = make_batch(seed=2, n=3)
    other = make_batch(seed=4, n=2)
    with torch.no_grad():
        first = shared_prefix_forward(model, batch.prefix_ids, batch.suffix_ids,
                                      batch.group_index, batch.prefix_lengths,
                                      batch.suffix_lengths)
        assert not first.state.keys[0].requires_grad
        again = shared_prefix_forward(model, first.state, other.suffix_ids, other.group_index,
                                      suffix_lengths=other.suffix_lengths)
        fresh = shared_prefix_forward(model, batch.prefix_ids, other.suffix_ids,
                                      other.group_index, batch.prefix_lengths,
                                      other.suffix_lengths)
    real = (torch.arange(other.suffix_ids.shape[1])[None] < other.suffix_lengths[:, None])
    torch.testing.assert_close(again.hidden_states[real], fresh.hidden_states[real])
    assert again.state is first.state


# --- refusals ---------------------------------------------------------------------------------


def _call(model, batch: Batch, **changes):
    args = dict(prefix_ids=batch.prefix_ids, suffix_ids=batch.suffix_ids,
                group_index=batch.group_index, prefix_lengths=batch.prefix_lengths,
                suffix_lengths=batch.suffix_lengths)
    args.update(changes)
    return shared_prefix_forward(model, **args)


def test_reentrant_checkpointing_raises() -> None:
    model = make_model("llama")
    enable_checkpointing(model, reentrant=True)
    with pytest.raises(ValueError, match="use_reentrant"):
        _call(model, make_batch(0, 2))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpointing_behind_an_opaque_wrapper_raises() -> None:
    """A checkpoint function whose use_reentrant cannot be read is caught when it runs."""
    from torch.utils.checkpoint import checkpoint

    model = make_model("llama")
    enable_checkpointing(model, reentrant=False)
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = (
                lambda f, *a, **k: checkpoint(f, *a, use_reentrant=True, **k))
    with pytest.raises(ValueError, match="use_reentrant"):
        _call(model, make_batch(0, 2))
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():  # no gradients, nothing to lose
        _call(model, make_batch(0, 2))


@pytest.mark.parametrize("arch,overrides", [
    ("mistral", dict(sliding_window=4)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
])
def test_sliding_window_raises(arch: str, overrides: dict) -> None:
    model = make_model(arch, **overrides)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        _call(model, make_batch(0, 2))


def test_sliding_window_longer_than_the_sequences_is_accepted() -> None:
    model = make_model("mistral", sliding_window=13)  # 7 + 6 tokens at most: no effect
    _call(model, make_batch(0, 2))


def test_unknown_model_type_raises() -> None:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'"):
        _call(model, make_batch(0, 1))


def test_check_prefix_model_before_any_call() -> None:
    """The public check a trainer runs up front: the model type, and a sliding window or
    max_position_embeddings against the longest sequence it will pass."""
    for arch in ARCHS:
        check_prefix_model(make_model(arch), max_length=64)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2))
    with pytest.raises(NotImplementedError, match="^model: model_type 'gpt2'"):
        check_prefix_model(gpt2)
    windowed = make_model("mistral", sliding_window=13)
    check_prefix_model(windowed)  # no length given: the window may never matter
    check_prefix_model(windowed, max_length=13)
    with pytest.raises(NotImplementedError, match="^model: sliding-window .*window 13"):
        check_prefix_model(windowed, max_length=14)
    with pytest.raises(ValueError, match="^max_length: 65 tokens .* max_position_embeddings 64"):
        check_prefix_model(make_model("llama"), max_length=65)
    with pytest.raises(ValueError, match="^max_length: must be a positive integer"):
        check_prefix_model(make_model("llama"), max_length=0)
    with pytest.raises(ValueError, match="^model: no Hugging Face decoder"):
        check_prefix_model(_NoDecoder(make_model("llama").config))


class _NoDecoder(torch.nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


def test_int32_indices_and_lengths_are_accepted() -> None:
    model = make_model("llama")
    batch = make_batch(0, 2)
    with torch.no_grad():
        want = _call(model, batch)
        got = _call(model, batch, group_index=batch.group_index.int(),
                    prefix_lengths=batch.prefix_lengths.int(),
                    suffix_lengths=batch.suffix_lengths.int())
    assert got.state.lengths.dtype == torch.int64
    real = torch.arange(batch.suffix_ids.shape[1])[None] < batch.suffix_lengths[:, None]
    torch.testing.assert_close(got.hidden_states[real], want.hidden_states[real])


def test_attention_dropout_raises() -> None:
    model = make_model("llama", attention_dropout=0.1)
    with pytest.raises(NotImplementedError, match="attention_dropout"):
        _call(model, make_batch(0, 1))
    model.eval()  # dropout off: fine
    _call(model, make_batch(0, 1))


def _left_padded(batch: Batch) -> torch.Tensor:
    ids = batch.prefix_ids.clone()
    g = 1
    n = int(batch.prefix_lengths[g])
    ids[g] = torch.cat([torch.full((ids.shape[1] - n,), PAD), ids[g, :n]])
    return ids


BAD_INPUTS = {
    "group_index out of range": (lambda b: dict(group_index=b.group_index + 1), "group_index"),
    "group_index negative": (lambda b: dict(group_index=b.group_index - 1), "group_index"),
    "group_index wrong length": (lambda b: dict(group_index=b.group_index[:-1]), "group_index"),
    "group_index float": (lambda b: dict(group_index=b.group_index.float()), "group_index"),
    "prefix_lengths zero": (lambda b: dict(prefix_lengths=b.prefix_lengths * 0),
                            "prefix_lengths"),
    "prefix_lengths too long": (lambda b: dict(prefix_lengths=b.prefix_lengths + 8),
                                "prefix_lengths"),
    "prefix_lengths wrong shape": (lambda b: dict(prefix_lengths=b.prefix_lengths[:1]),
                                   "prefix_lengths"),
    "suffix_lengths zero": (lambda b: dict(suffix_lengths=b.suffix_lengths * 0),
                            "suffix_lengths"),
    "suffix_lengths too long": (lambda b: dict(suffix_lengths=b.suffix_lengths + 7),
                                "suffix_lengths"),
    "suffix_lengths float": (lambda b: dict(suffix_lengths=b.suffix_lengths.float()),
                             "suffix_lengths"),
    "empty prefix": (lambda b: dict(prefix_ids=b.prefix_ids[:, :0], prefix_lengths=None),
                     "prefix_ids"),
    "empty suffix": (lambda b: dict(suffix_ids=b.suffix_ids[:, :0], suffix_lengths=None),
                     "suffix_ids"),
    "no groups": (lambda b: dict(prefix_ids=b.prefix_ids[:0], prefix_lengths=None),
                  "prefix_ids"),
    "1-d suffix": (lambda b: dict(suffix_ids=b.suffix_ids[0]), "suffix_ids"),
    "float ids": (lambda b: dict(suffix_ids=b.suffix_ids.float()), "suffix_ids"),
    "left padding": (lambda b: dict(prefix_ids=_left_padded(b)), "right"),
    "past max positions": (lambda b: dict(
        suffix_ids=torch.ones(len(b.group_index), 60, dtype=torch.int64), suffix_lengths=None),
        "max_position_embeddings"),
    "state with lengths": (lambda b: dict(prefix_ids=_STATE, prefix_lengths=b.prefix_lengths),
                           "prefix_lengths"),
}
_STATE: PrefixState | None = None


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_naming_the_argument(case: str) -> None:
    global _STATE
    model = make_model("llama")
    batch = make_batch(0, 2)
    with torch.no_grad():
        _STATE = prefix_forward(model, batch.prefix_ids, batch.prefix_lengths)
    change, name = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=name):
        _call(model, batch, **change(batch))
    assert model.config._attn_implementation == "sdpa"


def test_extend_prefix_bad_inputs() -> None:
    model = make_model("llama")
    batch = make_batch(0, 2)
    with torch.no_grad():
        state = prefix_forward(model, batch.prefix_ids, batch.prefix_lengths)
        with pytest.raises(ValueError, match="extra_ids"):
            extend_prefix(model, state, batch.prefix_ids[:1])  # one row for two groups
        with pytest.raises(ValueError, match="extra_lengths"):
            extend_prefix(model, state, batch.prefix_ids, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="max_position_embeddings"):
            extend_prefix(model, state, torch.ones(2, 60, dtype=torch.int64))
        with pytest.raises(ValueError, match="state"):
            extend_prefix(model, "not a state", batch.prefix_ids)
        other = make_model("llama", num_key_value_heads=4)
        with pytest.raises(ValueError, match="state"):
            extend_prefix(other, state, batch.prefix_ids)


class _Validated(Exception):
    """Raised in place of the model passes: the call got through its checks."""


def _stop(*args, **kwargs):
    raise _Validated


def test_each_public_call_reads_the_host_once(monkeypatch) -> None:
    """The data checks of one call (lengths, left padding, group range, total length) read
    their values in one transfer: one sync on an accelerator, not one per check."""
    import opsd_kernels.prefix as prefix

    model = make_model("llama")
    batch = make_batch(0, 2)
    with torch.no_grad():
        state = prefix_forward(model, batch.prefix_ids, batch.prefix_lengths)
    monkeypatch.setattr(prefix, "_prefix_pass", _stop)
    monkeypatch.setattr(prefix, "_suffix_pass", _stop)
    reads = []

    def counted(name: str):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return real(self, *args, **kwargs)

        return read

    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    calls = {
        "prefix_forward": lambda: prefix_forward(model, batch.prefix_ids, batch.prefix_lengths),
        "shared_prefix_forward": lambda: _call(model, batch),
        "shared_prefix_forward(state)": lambda: _call(model, batch, prefix_ids=state,
                                                      prefix_lengths=None),
        "extend_prefix": lambda: extend_prefix(model, state, batch.prefix_ids,
                                               batch.prefix_lengths),
    }
    for what, call in calls.items():
        reads.clear()
        with pytest.raises(_Validated):
            call()
        assert reads == ["tolist"], f"{what}: host reads {reads}"


def test_attention_function_outside_a_prefix_call_raises() -> None:
    model = make_model("llama")
    batch = make_batch(0, 1)
    with torch.no_grad():
        shared_prefix_forward(model, batch.prefix_ids, batch.suffix_ids, batch.group_index)
    model.set_attn_implementation(ATTENTION_NAME)
    with pytest.raises(RuntimeError, match="only works inside"):
        model(batch.suffix_ids)


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    """bench/bench_prefix.py still runs (tiny model, one round)."""
    env = dict(os.environ, OPSD_BENCH_SMOKE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_prefix.py",
         f"--benchmark-json={tmp_path / 'smoke.json'}"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
