"""TRL's GKD and SDFT trainers with the fused loss (`opsd_kernels.integrations.trl`).

The oracle is TRL's own `compute_loss` (full logits, fp32), run on the same trainer instance and
the same batch: the fused `compute_loss` must give the same value and the same gradient of every
trainable parameter (relative 1e-5). The models, tokenizer and data come from trl_fixtures.py;
the same under FSDP2: test_integrations_trl_fsdp.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
gkd = pytest.importorskip("trl.experimental.gkd")
sdft = pytest.importorskip("trl.experimental.sdft")

from trl_fixtures import (  # noqa: E402
    SDFT_EXAMPLES,
    VOCAB,
    gkd_config,
    gkd_dataset,
    perturb,
    sdft_batch,
    sdft_config,
    sdft_dataset,
    tiny_model,
    tiny_tokenizer,
)

from opsd_kernels.integrations.trl import (  # noqa: E402
    FusedGKDTrainer,
    FusedSDFTTrainer,
)

RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads; on a shared machine idle intra-op threads spin
    and made this file ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- comparison helpers -------------------------------------------------------------------------


def _loss_and_grads(model: nn.Module, fn: Callable[[], torch.Tensor]):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Relative 1e-5, elementwise against the size of the expected tensor."""
    scale = max(expected.detach().abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=RTOL,
                               atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def _assert_matches(model: nn.Module, fused: Callable[[], torch.Tensor],
                    oracle: Callable[[], torch.Tensor]) -> torch.Tensor:
    expected, expected_grads = _loss_and_grads(model, oracle)
    actual, grads = _loss_and_grads(model, fused)
    assert expected.abs() > 1e-4, f"degenerate test: TRL's loss is {expected.item()}"
    _close(actual, expected, "loss")
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in expected_grads.items():
        assert grad is not None and grads[name] is not None, f"{name}: no gradient"
        _close(grads[name], grad, f"grad of {name}")
    assert any(g.abs().max() > 0 for g in grads.values())
    return actual


# --- GKD ----------------------------------------------------------------------------------------






@pytest.fixture(scope="module")
def gkd_setup(tmp_path_factory) -> Iterator[tuple]:
    """A fused GKD trainer (student and a different teacher, untied heads) and a collated batch:
    left padding, prompt tokens masked with -100, completions of different lengths."""
    trainer = FusedGKDTrainer(
        model=tiny_model(0), teacher_model=tiny_model(1),
        args=gkd_config(tmp_path_factory.mktemp("gkd")), train_dataset=gkd_dataset(),
        processing_class=tiny_tokenizer())
    batch = trainer.data_collator([dict(row) for row in trainer.train_dataset])
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()
    trainer.model.train()
    yield trainer, batch


@pytest.mark.parametrize("num_items", [None, 37], ids=["token-mean", "num-items"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_matches_trl(gkd_setup, monkeypatch, beta, num_items):
    """TRL's GKD loss is at temperature 1 whatever args.temperature (0.7 here) says."""
    trainer, batch = gkd_setup
    monkeypatch.setattr(trainer, "beta", beta)
    _assert_matches(
        trainer.model,
        lambda: trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items),
        lambda: gkd.GKDTrainer.compute_loss(trainer, trainer.model, batch,
                                            num_items_in_batch=num_items))


@pytest.mark.parametrize("rows, width", [(0, 6), (2, 1)], ids=["no-rows", "one-token"])
def test_gkd_batch_without_predicted_tokens_gives_zero_grads(gkd_setup, rows, width):
    """No sequences, or sequences of one token (nothing to predict): loss 0 on the graph, and
    every trainable parameter gets a zero gradient of its shape, as with a non-empty batch."""
    trainer, batch = gkd_setup
    empty = {k: v[:rows, :width] for k, v in batch.items()
             if k in ("input_ids", "attention_mask", "labels")}
    loss, grads = _loss_and_grads(trainer.model,
                                  lambda: trainer.compute_loss(trainer.model, empty))
    assert loss.item() == 0.0 and grads
    assert all(g is not None and not g.any() for g in grads.values())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_loss_temperature_matches_generalized_jsd(gkd_setup, monkeypatch, beta):
    """loss_temperature: TRL's generalized_jsd_loss(..., temperature=) on the full logits."""
    trainer, batch = gkd_setup
    monkeypatch.setattr(trainer, "beta", beta)
    monkeypatch.setattr(trainer, "loss_temperature", 0.7)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def oracle() -> torch.Tensor:
        student = trainer.model(input_ids=ids, attention_mask=mask).logits
        with torch.no_grad():
            teacher = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits
        return gkd.GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1],
                                                   labels=batch["labels"][:, 1:], beta=beta,
                                                   temperature=0.7)

    _assert_matches(trainer.model, lambda: trainer.compute_loss(trainer.model, batch), oracle)


def test_gkd_through_a_wrapper_and_in_eval(gkd_setup):
    """A wrapped student (DataParallel, which accelerate unwraps) runs through the wrapper's
    forward; in eval, prediction_step gives TRL's loss and the student's logits."""
    trainer, batch = gkd_setup
    wrapped = nn.DataParallel(trainer.model)
    own_forward = trainer.model.__dict__.get("forward")  # accelerate may have patched it
    calls = []
    handle = wrapped.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        _assert_matches(trainer.model, lambda: trainer.compute_loss(wrapped, batch),
                        lambda: gkd.GKDTrainer.compute_loss(trainer, wrapped, batch))
    finally:
        handle.remove()
    assert len(calls) == 2  # once for TRL's forward, once for ours
    assert trainer.model.__dict__.get("forward") is own_forward, "forward was not restored"

    trainer.model.eval()
    try:
        loss, logits, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
        with torch.no_grad():
            expected, outputs = gkd.GKDTrainer.compute_loss(trainer, trainer.model, batch,
                                                            return_outputs=True)
    finally:
        trainer.model.train()
    _close(loss, expected, "eval loss")
    _close(logits, outputs.logits, "eval logits")


def test_gkd_trains_on_policy(tmp_path):
    """A real training step: on-policy generation (lmbda=1), bf16 mixed precision, the torch
    backend, Trainer's num_items_in_batch; the weights move. Under mixed precision both decoders
    run in accelerate's autocast, as in TRL (the fused loss itself stays in fp32, so the values
    agree with TRL's, whose lm_head rounds the logits to bf16, only roughly)."""
    trainer = FusedGKDTrainer(
        model=tiny_model(2), teacher_model=tiny_model(3),
        args=gkd_config(tmp_path, lmbda=1.0, per_device_train_batch_size=2, learning_rate=1e-2,
                         bf16=True),
        train_dataset=gkd_dataset(), processing_class=tiny_tokenizer(), fused_backend="torch",
        fused_chunk_size=5)
    assert trainer.accelerator.native_amp
    batch = trainer.data_collator([dict(row) for row in trainer.train_dataset])
    dtypes = []
    hooks = [m.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda _m, _i, out: dtypes.append(out.dtype)) for m in (trainer.model,
                                                                trainer.teacher_model)]
    try:
        fused = trainer.compute_loss(trainer.model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert dtypes == [torch.bfloat16, torch.bfloat16], dtypes  # teacher, then student
    with torch.no_grad():
        expected = gkd.GKDTrainer.compute_loss(trainer, trainer.model, batch)
    torch.testing.assert_close(fused.detach(), expected, rtol=5e-2, atol=0)

    before = trainer.model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.training_loss > 0
    assert not torch.equal(before, trainer.model.lm_head.weight)


# --- SDFT ---------------------------------------------------------------------------------------








@pytest.fixture(scope="module")
def sdft_setup(tmp_path_factory) -> Iterator[tuple]:
    """A fused SDFT trainer: student loaded from a saved tiny model (tied embeddings), the
    frozen base teacher TRL loads from the same path, the student moved away from it."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model(4, tie_word_embeddings=True).save_pretrained(path)
    trainer = FusedSDFTTrainer(model=str(path), args=sdft_config(tmp_path_factory.mktemp("sd")),
                               train_dataset=sdft_dataset(), processing_class=tiny_tokenizer())
    assert trainer.teacher_model is not trainer.model
    perturb(trainer.model, 5)
    batch = sdft_batch(trainer, [5, 0, 3], seed=6)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop in real runs
    yield trainer, batch


SDFT_CASES = [  # (distillation_mode, alpha, add_tail, tokens to skip)
    pytest.param("full_logits", 0.0, False, 0, id="full-forward_kl"),
    pytest.param("full_logits", 0.5, False, 0, id="full-jsd"),
    pytest.param("full_logits", 1.0, False, 1, id="full-reverse_kl-skip1"),
    pytest.param("topk_logits", 0.5, False, 0, id="topk-renormalised"),
    pytest.param("topk_logits", 0.0, True, 0, id="topk-tail-forward_kl"),
    pytest.param("topk_logits", 0.5, True, 2, id="topk-tail-jsd-skip2"),
    pytest.param("sampled_token", 1.0, False, 0, id="sampled"),
]


def _set_sdft(monkeypatch, trainer, mode: str, alpha: float, tail: bool, skip: int) -> None:
    monkeypatch.setattr(trainer.args, "distillation_mode", mode)
    monkeypatch.setattr(trainer.args, "distillation_alpha", alpha)
    monkeypatch.setattr(trainer.args, "distillation_add_tail", tail)
    monkeypatch.setattr(trainer, "num_loss_tokens_to_skip", skip)


def _logged(trainer) -> float:
    mode = "train" if trainer.model.training else "eval"
    return trainer._metrics[mode]["self_distillation/distillation_loss"][-1]


def _sdft_matches(trainer, batch) -> None:
    model = trainer.model
    _assert_matches(model, lambda: trainer.compute_loss(model, batch),
                    lambda: sdft.SDFTTrainer.compute_loss(trainer, model, batch))
    expected_metric = _logged(trainer)
    trainer.compute_loss(model, batch)
    assert abs(_logged(trainer) - expected_metric) <= RTOL * abs(expected_metric) + 1e-9


@pytest.mark.parametrize("mode, alpha, tail, skip", SDFT_CASES)
def test_sdft_matches_trl(sdft_setup, monkeypatch, mode, alpha, tail, skip):
    """Temperature 0.7, an empty completion, two gradient-accumulation steps."""
    trainer, batch = sdft_setup
    _set_sdft(monkeypatch, trainer, mode, alpha, tail, skip)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 2, raising=False)
    trainer.model.train()
    _sdft_matches(trainer, batch)


@pytest.mark.parametrize("mode, alpha, tail, skip", [SDFT_CASES[1], SDFT_CASES[5],
                                                     SDFT_CASES[6]])
def test_sdft_importance_clipping_matches_trl(sdft_setup, monkeypatch, mode, alpha, tail, skip):
    """Rollout log-probs in the batch: each token's loss times the clipped importance ratio."""
    trainer, batch = sdft_setup
    _set_sdft(monkeypatch, trainer, mode, alpha, tail, skip)
    monkeypatch.setattr(trainer.args, "distillation_is_clip", 1.5)
    with torch.no_grad():  # the student at rollout time: its current log-probs, shaken
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].size(1)
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -width:]
        logps = torch.log_softmax(logits / trainer.temperature, -1)
        logps = logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
        gen = torch.Generator().manual_seed(7)
        old = logps + 0.7 * torch.randn(logps.shape, generator=gen)
    _sdft_matches(trainer, {**batch, "old_per_token_logps": old})


def test_sdft_eval_and_all_masked(sdft_setup):
    """Eval mode (no accumulation scaling, no graph) and a batch without loss tokens."""
    trainer, batch = sdft_setup
    trainer.model.eval()
    try:
        with torch.no_grad():
            _close(trainer.compute_loss(trainer.model, batch),
                   sdft.SDFTTrainer.compute_loss(trainer, trainer.model, batch), "eval loss")
    finally:
        trainer.model.train()
    empty = sdft_batch(trainer, [0, 0, 0], seed=8)
    empty["completion_ids"] = torch.full((3, 2), trainer._tokenizer.pad_token_id)
    empty["completion_mask"] = torch.zeros(3, 2, dtype=torch.long)
    empty.update(trainer.teacher_context_builder.build(
        [q for q, _ in SDFT_EXAMPLES], [c for _, c in SDFT_EXAMPLES], empty["completion_ids"],
        empty["completion_mask"]))
    loss, grads = _loss_and_grads(trainer.model, lambda: trainer.compute_loss(trainer.model,
                                                                              empty))
    assert loss.item() == 0.0
    assert all(g is None or not g.any() for g in grads.values())


def test_sdft_peft_base_teacher_matches_trl(tmp_path):
    """LoRA student; the teacher is the same model with the adapter disabled (TRL's 'base'
    teacher under PEFT); only the adapter weights train."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")
    trainer = FusedSDFTTrainer(model=tiny_model(9), args=sdft_config(tmp_path),
                               train_dataset=sdft_dataset(), processing_class=tiny_tokenizer(),
                               peft_config=lora)
    assert trainer.teacher_model is trainer.model and hasattr(trainer.model, "get_base_model")
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = sdft_batch(trainer, [4, 6, 2], seed=10)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    for mode, alpha in (("full_logits", 0.5), ("topk_logits", 1.0)):
        trainer.args.distillation_mode, trainer.args.distillation_alpha = mode, alpha
        _sdft_matches(trainer, batch)


def test_sdft_trains(tmp_path):
    """A real training step with generation (the live teacher: the student itself)."""
    trainer = FusedSDFTTrainer(model=tiny_model(11), args=sdft_config(
        tmp_path, teacher_model_kind="live", learning_rate=1e-2), train_dataset=sdft_dataset(),
        processing_class=tiny_tokenizer(), fused_chunk_size=3)
    before = trainer.model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, trainer.model.lm_head.weight)


# --- errors -------------------------------------------------------------------------------------


def test_sdft_refuses_what_it_cannot_express(sdft_setup, monkeypatch, tmp_path):
    trainer, batch = sdft_setup
    with pytest.raises(ValueError, match="use_teacher_server"):
        FusedSDFTTrainer(model=tiny_model(12), args=sdft_config(tmp_path, use_teacher_server=True),
                         train_dataset=sdft_dataset(), processing_class=tiny_tokenizer())
    with monkeypatch.context() as m:
        m.setattr(trainer.args, "use_teacher_server", True)
        with pytest.raises(ValueError, match="use_teacher_server"):
            trainer.compute_loss(trainer.model, batch)
    with monkeypatch.context() as m:
        m.setattr(trainer.args, "distillation_topk", None)
        with pytest.raises(ValueError, match="distillation_topk"):
            trainer.compute_loss(trainer.model, batch)
    with monkeypatch.context() as m:
        m.setattr(trainer.args, "distillation_topk", VOCAB + 1)
        with pytest.raises(ValueError, match="top_k"):
            trainer.compute_loss(trainer.model, batch)
    with pytest.raises(ValueError, match="return outputs"):
        trainer.compute_loss(trainer.model, batch, return_outputs=True)
    with pytest.raises(ValueError, match="teacher_input_ids"):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items()
                                             if k != "teacher_input_ids"})


def test_gkd_errors(gkd_setup, monkeypatch, tmp_path):
    trainer, batch = gkd_setup
    with pytest.raises(ValueError, match="'labels'"):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match=r"inputs\['input_ids'\] must be a \[batch, length\]"):
        trainer.compute_loss(trainer.model, {**batch, "input_ids": batch["input_ids"][0]})
    with pytest.raises(ValueError, match="labels: values must be in"):
        trainer.compute_loss(trainer.model, {**batch, "labels": batch["labels"] + 1000})
    for bad in ({"loss_temperature": 0.0}, {"fused_backend": "cuda"}, {"fused_chunk_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FusedGKDTrainer(model=tiny_model(0), teacher_model=tiny_model(1),
                            args=gkd_config(tmp_path), train_dataset=gkd_dataset(),
                            processing_class=tiny_tokenizer(), **bad)

    peft = pytest.importorskip("peft")
    on_head = peft.get_peft_model(tiny_model(1), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    monkeypatch.setattr(trainer, "teacher_model", on_head)
    with pytest.raises(ValueError, match="remove 'lm_head' from the adapter's target_modules"):
        trainer.compute_loss(trainer.model, batch)
    prompt_tuning = peft.get_peft_model(tiny_model(1), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2))
    monkeypatch.setattr(trainer, "teacher_model", prompt_tuning)
    with pytest.raises(ValueError, match="prompt-learning"):
        trainer.compute_loss(trainer.model, batch)
    scaled = tiny_model(1)
    scaled.config.logits_scaling = 4.0  # Granite-style logits / 4: not in the fused loss
    monkeypatch.setattr(trainer, "teacher_model", scaled)
    with pytest.raises(ValueError, match="logits_scaling"):
        trainer.compute_loss(trainer.model, batch)


def test_trainer_classes_are_built_once() -> None:
    """Once asked for, a trainer class is built once and both import paths give it (that the
    integration imports neither TRL nor transformers before: test_package.py)."""
    import opsd_kernels.integrations as integrations

    assert integrations.FusedSDFTTrainer is FusedSDFTTrainer
    assert issubclass(FusedSDFTTrainer, (integrations.FusedSDFTMixin, sdft.SDFTTrainer))
    assert FusedGKDTrainer.__module__ == "opsd_kernels.integrations.trl"
    with pytest.raises(AttributeError, match="FusedSFTTrainer"):
        _ = integrations.FusedSFTTrainer
