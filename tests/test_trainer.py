"""The training loop on a tiny config-built model: every teacher mode, with and without LoRA
and shared prefixes, learns; resume continues the interrupted run exactly; bad data and configs
fail before training; metrics, checkpoints and the final model are written."""

from __future__ import annotations

import json
import re

import pytest
import torch
from trainer_fixtures import mixed_precision, problems, small_config, small_model

from opsd_kernels.trainer import OPSDConfig, OPSDTrainer, SamplingParams
from opsd_kernels.trainer.objective import RolloutBatch

MODES = [
    {"teacher_mode": "current"},
    {"teacher_mode": "ema", "ema_decay": 0.5},
    {"teacher_mode": "current", "lora": True, "lora_rank": 4},
    {"teacher_mode": "fixed", "lora": True, "lora_rank": 4},
    {"teacher_mode": "ema", "ema_decay": 0.5, "lora": True, "lora_rank": 4},
]


def _trainer(tmp_path, data=None, **overrides) -> OPSDTrainer:
    config = small_config(tmp_path, **overrides)
    model, tokenizer = small_model()
    return OPSDTrainer(model, tokenizer, data or problems(), config)


def _fixed_batch_loss(trainer: OPSDTrainer, batch: RolloutBatch) -> float:
    with torch.no_grad():
        loss, _ = trainer.objective(batch, torch.tensor(float(batch.num_tokens)))
    return loss.item()


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared", "plain"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_loss_on_a_fixed_batch_goes_down(tmp_path, mode, shared_prefix) -> None:
    lr = 1e-2
    trainer = _trainer(tmp_path, problems(2), max_steps=5, learning_rate=lr,
                       shared_prefix=shared_prefix, **mode)
    torch.manual_seed(123)
    batch = trainer._rollouts(trainer.train_problems)
    before = _fixed_batch_loss(trainer, batch)
    history = trainer.train()
    after = _fixed_batch_loss(trainer, batch)
    assert len(history) == 5 and all(h["loss"] >= 0 for h in history)
    # A fixed teacher is the hardest target (rank-4 adapters chase it): about 0.75x here.
    assert after < 0.8 * before, (before, after)


def test_shared_prefixes_under_bf16_autocast_match_the_plain_pass(tmp_path) -> None:
    """accelerate's bf16 on one process is autocast, under which Qwen3's q / k norms hand the
    attention fp32 queries and keys beside bf16 values: the shared-prefix pass computes them in
    bf16, as autocast does for sdpa, and agrees with the plain pass to bf16's precision."""
    results = {}
    with mixed_precision("bf16"):
        for shared in (True, False):
            trainer = _trainer(tmp_path / str(shared), problems(2), shared_prefix=shared)
            assert trainer.accelerator.native_amp
            torch.manual_seed(123)
            batch = trainer._rollouts(trainer.train_problems)
            loss, _ = trainer.objective(batch, torch.tensor(float(batch.num_tokens)))
            loss.backward()
            head = trainer.model.get_output_embeddings().weight.grad
            results[shared] = loss.detach(), head
    (loss, grad), (plain_loss, plain_grad) = results[True], results[False]
    # bf16 keeps 8 significant bits (unit roundoff 2^-8): a few roundings apart at most.
    torch.testing.assert_close(loss, plain_loss, rtol=4 * 2**-8, atol=0)
    assert (grad - plain_grad).norm() <= 4 * 2**-8 * plain_grad.norm()


def test_fp16_outside_deepspeed_is_refused(tmp_path) -> None:
    with mixed_precision("fp16"), pytest.raises(ValueError, match="fp16 is not supported"):
        _trainer(tmp_path)


def test_sft_loss_goes_down_and_trains_on_teacher_prompts_when_asked(tmp_path) -> None:
    trainer = _trainer(tmp_path, problems(2), method="sft", max_steps=5,
                       sft_teacher_prompts=True)
    batch = trainer._rollouts(trainer.train_problems)
    assert len(batch.responses) == 4  # each target under both prompts
    assert [p.student for p in batch.problems[2:]] == [p.teacher for p in batch.problems[:2]]
    history = trainer.train()
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]


def test_metrics_checkpoints_and_final_model_are_written(tmp_path) -> None:
    trainer = _trainer(tmp_path, max_steps=2, save_steps=1, eval_data=None)
    trainer.eval_problems = trainer.train_problems[:3]
    history = trainer.train()
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2]  # two steps, then the final evaluation
    expected = {"loss", "divergence", "student_entropy", "teacher_entropy", "response_length",
                "accuracy", "tokens_per_s", "peak_memory_mib", "learning_rate", "grad_norm"}
    assert expected <= set(lines[0]) and "eval_accuracy" in lines[2]
    assert lines[0]["loss"] == pytest.approx(history[0]["loss"])
    assert 1 <= lines[0]["response_length"] <= 24
    for name in ("checkpoints/checkpoint_1", "checkpoints/checkpoint_2", "final"):
        assert (out / name / "config.json").exists(), name
    assert (out / "final" / "tokenizer.json").exists()
    # accelerate's state beside the model: optimizer, scheduler, step and teacher
    assert {"optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"} <= {
        p.name for p in (out / "checkpoints" / "checkpoint_2").iterdir()}


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path) -> None:
    trainer = _trainer(tmp_path, max_steps=3, save_steps=1, save_total_limit=2)
    trainer.train()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["checkpoint_2", "checkpoint_3"]


@pytest.mark.parametrize("mode", [{"teacher_mode": "current"},
                                  {"teacher_mode": "ema", "lora": True, "lora_rank": 4}],
                         ids=["full-current", "lora-ema"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, mode) -> None:
    steps = dict(max_steps=4, save_steps=2, **mode)
    full = _trainer(tmp_path / "a", **steps).train()
    first = _trainer(tmp_path / "b", **{**steps, "max_steps": 2}).train()
    resumed_trainer = _trainer(tmp_path / "b", **{**steps, "resume": True})
    resumed = resumed_trainer.train()
    assert resumed_trainer.step == 4 and len(resumed) == 2
    assert [h["loss"] for h in first] == [h["loss"] for h in full[:2]]
    # Same rollouts (RNG from (seed, step)), same weights, optimizer, scheduler and EMA.
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full[2:]],
                                                         rel=1e-6, abs=1e-9)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


ONE = {"num_processes": 1, "sharding": "replicated"}


@pytest.mark.parametrize(("saved", "files", "current", "outcome"), [
    (ONE, [], ONE, False),
    ({"num_processes": 4, "sharding": "replicated"}, [], ONE, False),  # DDP: the whole state
    ({"num_processes": 1, "sharding": "fsdp2"}, [], ONE, "1 processes (fsdp2)"),
    ({"num_processes": 2, "sharding": "zero3"}, [], ONE, "2 processes (zero3)"),
    ({"num_processes": 2, "sharding": "zero3"}, [],
     {"num_processes": 2, "sharding": "zero3"}, False),
    ({"num_processes": 2, "sharding": "zero3"}, [],  # read as a universal checkpoint
     {"num_processes": 1, "sharding": "zero3"}, True),
    ({"num_processes": 2, "sharding": "zero2"}, [],
     {"num_processes": 2, "sharding": "zero3"}, "2 processes (zero2)"),
    ({"num_processes": 2, "sharding": "fsdp2"}, [],  # torch.distributed.checkpoint reshards
     {"num_processes": 4, "sharding": "fsdp2"}, False),
    (ONE, [], {"num_processes": 2, "sharding": "fsdp2"}, "this run has 2 (fsdp2)"),
    # written before the layout was recorded: read from accelerate's files
    ({}, ["pytorch_model_fsdp_0/", "random_states_0.pkl", "random_states_1.pkl"], ONE,
     "2 processes (fsdp2)"),
    ({}, ["pytorch_model/", "random_states_0.pkl", "random_states_1.pkl"],
     {"num_processes": 2, "sharding": "zero2"}, False),
    ({}, ["pytorch_model/", "random_states_0.pkl", "random_states_1.pkl"],  # stage unknown
     {"num_processes": 1, "sharding": "zero2"}, "2 processes (zero)"),
    ({}, ["random_states_0.pkl", "random_states_1.pkl"], ONE, False),
], ids=["same", "ddp-on-one", "fsdp2-on-replicated", "zero3-on-replicated", "zero3-same",
        "zero3-2-on-1", "zero2-as-zero3", "fsdp2-2-on-4", "replicated-on-fsdp2", "old-fsdp2",
        "old-zero-same", "old-zero-2-on-1", "old-ddp"])
def test_the_layout_of_a_checkpoint_is_checked_before_resuming(tmp_path, saved, files,
                                                              current, outcome) -> None:
    from opsd_kernels.trainer import checkpoint

    torch.save({"step": 3, **saved}, tmp_path / checkpoint.PROGRESS_FILE)
    for name in files:
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).touch()
    if isinstance(outcome, bool):  # whether it is read as a DeepSpeed universal checkpoint
        assert checkpoint.check_layout(tmp_path, current) is outcome
    else:
        with pytest.raises(ValueError, match=rf"checkpoint {tmp_path} .*{re.escape(outcome)}"):
            checkpoint.check_layout(tmp_path, current)


def test_an_interrupted_save_is_never_resumed_from(tmp_path) -> None:
    _trainer(tmp_path, max_steps=2, save_steps=1).train()
    partial = tmp_path / "run" / "checkpoints" / "checkpoint_2"
    (partial / "custom_checkpoint_1.pkl").unlink()  # written last: the save stopped before it
    resumed = _trainer(tmp_path, max_steps=3, resume=True)
    assert len(resumed.train()) == 2 and resumed.step == 3  # from checkpoint_1


def _nan_on_steps(trainer: OPSDTrainer, steps: set[int], monkeypatch) -> None:
    """The objective's loss becomes NaN on the given (1-based) steps."""
    forward = trainer.objective.forward

    def poisoned(batch, num_items, *targets):
        loss, sums = forward(batch, num_items, *targets)
        return (loss * float("nan") if trainer.step + 1 in steps else loss), sums

    monkeypatch.setattr(trainer.objective, "forward", poisoned)


def test_a_non_finite_step_is_skipped_and_reported(tmp_path, monkeypatch, capsys) -> None:
    trainer = _trainer(tmp_path, max_steps=3)
    _nan_on_steps(trainer, {2}, monkeypatch)
    history = trainer.train()
    before = [p.detach().clone() for p in trainer.params]
    assert [h.get("skipped", 0) for h in history] == [0, 1, 0]
    assert all(torch.isfinite(p).all() for p in before)  # the NaN gradient never reached them
    assert trainer.step == 3 and trainer.nonfinite.in_a_row == 0
    assert "step 2: loss nan" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [r.get("skipped", 0) for r in lines] == [0, 1, 0]


def test_non_finite_steps_in_a_row_stop_training(tmp_path, monkeypatch) -> None:
    from opsd_kernels.trainer import TrainingStopped

    trainer = _trainer(tmp_path, max_steps=6, max_nonfinite_steps=2)
    _nan_on_steps(trainer, {2, 3, 4}, monkeypatch)
    with pytest.raises(TrainingStopped, match=r"^step 3: 2 steps in a row with a non-finite"):
        trainer.train()


def test_gradient_accumulation_uses_one_global_token_count(tmp_path) -> None:
    """Two micro-batches of 1 problem give the gradient of one batch of 2 problems."""
    data = problems(2)
    grads = []
    for accumulation, per_step in ((1, 2), (2, 1)):
        trainer = _trainer(tmp_path / str(accumulation), data, problems_per_step=per_step,
                           gradient_accumulation_steps=accumulation, max_grad_norm=None)
        trainer.engine = _FixedEngine()
        step_problems = trainer._problems_for(0, 0)
        if accumulation == 2:
            step_problems += trainer._problems_for(0, 1)
        trainer.optimizer.step = lambda: None  # keep the gradients to compare
        trainer.scheduler.step = lambda: None  # (it would warn that the optimizer never stepped)
        trainer.optimizer.zero_grad = lambda set_to_none=True: None
        trainer.train_step()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        assert sorted(p.student for p in step_problems) == sorted(
            p.student for p in trainer.train_problems)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


class _FixedEngine:
    """A rollout engine that answers every prompt with the same few tokens."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts, params: SamplingParams) -> list[list[int]]:
        self.calls += 1
        return [[5 + (len(p) + k) % 7, 6, 7][: 1 + k % 3] for p in prompts
                for k in range(params.num_samples)]


def test_a_custom_rollout_engine_is_used(tmp_path) -> None:
    engine = _FixedEngine()
    config = small_config(tmp_path, max_steps=1)
    model, tokenizer = small_model()
    trainer = OPSDTrainer(model, tokenizer, problems(), config, rollout_engine=engine)
    history = trainer.train()
    assert engine.calls == 1
    assert history[0]["response_length"] == pytest.approx(2.0)  # lengths 1, 2, 3


def test_hf_engine_samples_num_samples_responses_ending_at_eos(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    prompts = [p.student for p in trainer.train_problems[:3]]
    responses = trainer.engine.generate(prompts, SamplingParams(num_samples=4,
                                                                max_new_tokens=8))
    eos = trainer.tokenizer.eos_token_id
    assert len(responses) == 12
    for r in responses:
        assert 1 <= len(r) <= 8 and (eos not in r or r.index(eos) == len(r) - 1)
    greedy = trainer.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert greedy == trainer.engine.generate(prompts, SamplingParams(temperature=0.0,
                                                                     max_new_tokens=8))


def test_hf_engine_never_samples_the_pad_token(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    pad = trainer.tokenizer.pad_token_id
    lm = trainer.model
    with torch.no_grad():  # make pad by far the likeliest token after every prompt
        lm.get_output_embeddings().weight[pad] = 50 * lm.model.norm.weight
    prompts = [p.student for p in trainer.train_problems[:4]]
    torch.manual_seed(0)
    for temperature in (0.0, 1.0):
        responses = trainer.engine.generate(prompts, SamplingParams(
            num_samples=2, temperature=temperature, max_new_tokens=6))
        assert len(responses) == 8 and all(pad not in r for r in responses)
    assert responses[0] != responses[1] or responses[2] != responses[3]  # sampled: they vary
    engine = _FixedEngine()
    engine.generate = lambda prompts, params: [[pad, 5]] * (len(prompts) * params.num_samples)
    trainer.engine = engine
    with pytest.raises(RuntimeError, match="starts with the pad token"):
        trainer.train_step()


def test_evaluate_reports_accuracy_of_greedy_answers(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    tokenizer, chosen = trainer.tokenizer, trainer.train_problems[:4]
    answers = {tuple(p.student): p.answer for p in chosen}

    class Answers:  # right on every problem but the first
        def generate(self, prompts, params):
            texts = [f"so \\boxed{{{'x' if i == 0 else answers[tuple(p)]}}}"
                     for i, p in enumerate(prompts)]
            return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    trainer.engine = Answers()
    result = trainer.evaluate(chosen)
    assert result["eval_accuracy"] == pytest.approx(0.75) and result["eval_problems"] == 4


# --- failing early -------------------------------------------------------------------------


@pytest.mark.parametrize("rows, message", [
    ([{"question": "1+1?", "solution": "2"}], "no column 'problem'"),
    ([{"problem": "1+1?", "solution": "  "}, {"problem": "", "solution": "x"}],
     "2 row(s) have an empty"),
    ([{"problem": "x" * 400, "solution": "y"}], "every problem is longer than max_prompt"),
])
def test_bad_data_fails_before_training(tmp_path, rows, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _trainer(tmp_path, rows)


@pytest.mark.parametrize("overrides, message", [
    ({"max_prompt_length": 250, "max_new_tokens": 24}, "exceeds the model's max_position"),
    ({"lora": True, "lora_target_modules": ["q_proj", "lm_head"]}, "'lm_head' cannot take"),
])
def test_configs_the_model_cannot_run_fail_before_training(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, **overrides)


def test_shared_prefix_on_an_unsupported_model_fails_before_training(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from opsd_kernels.trainer.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1,
                                       n_head=2, n_positions=256))
    config = small_config(tmp_path)
    with pytest.raises(ValueError, match="shared_prefix: false"):
        OPSDTrainer(model, tokenizer, problems(), config)
    # without shared prefixes the plain path trains it
    plain = OPSDTrainer(model, tokenizer, problems(), config.replace(shared_prefix=False,
                                                                      max_steps=1))
    assert plain.train()[0]["loss"] >= 0


def test_overlong_problems_are_counted_and_reported(tmp_path, capsys) -> None:
    rows = problems(3) + [{"problem": "p" * 170, "solution": "s", "answer": "1"},
                          {"problem": "1+1?", "solution": "s" * 80, "answer": "2"}]
    trainer = _trainer(tmp_path, rows, max_prompt_length=60)
    report = capsys.readouterr().out
    assert "5 problems: 4 kept" in report and "1 skipped as longer than max_prompt_length" in report
    assert "1 with the reference solution truncated in the teacher prompt (max_prompt_length)" in (
        report) and "supervised target" not in report  # opsd samples its responses
    _trainer(tmp_path, rows, max_prompt_length=60, method="sft")
    # the solutions (about 30 tokens) do not fit max_new_tokens = 24 as sft targets
    assert "4 with the supervised target truncated (max_new_tokens" in capsys.readouterr().out
    assert all(len(p.teacher) <= 60 for p in trainer.train_problems)


def test_config_round_trip_through_yaml(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("model: tiny\nlearning_rate: 1e-5\nlora: true\nteacher_mode: fixed\n"
                    "lora_target_modules: [q_proj, v_proj]\nclip: null\n")
    config = OPSDConfig.from_yaml(path, {"max_steps": 7})
    assert (config.learning_rate, config.max_steps, config.lora_target_modules) == (
        1e-5, 7, ["q_proj", "v_proj"])


def test_tensorboard_is_written_or_its_absence_explained(tmp_path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the tensorboard package"):
            _trainer(tmp_path, tensorboard=True)
        return
    _trainer(tmp_path, max_steps=1, tensorboard=True).train()
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_sharded_setups_it_cannot_run_are_refused() -> None:
    """FSDP1 (the trainer runs DDP, FSDP2, ZeRO-2 and ZeRO-3: test_trainer_fsdp.py,
    test_trainer_deepspeed.py)."""
    from types import SimpleNamespace

    from opsd_kernels.trainer.trainer import _check_distributed

    fsdp1 = SimpleNamespace(distributed_type="FSDP",
                            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match="set fsdp_version: 2"):
        _check_distributed(fsdp1)
    _check_distributed(SimpleNamespace(distributed_type="MULTI_CPU", mixed_precision="no"))


def _zero3_accelerator(**zero):
    """What `zero.configure` reads of an accelerator whose DeepSpeed config is ZeRO-3."""
    from types import SimpleNamespace

    config = {"zero_optimization": {"stage": 3, **zero}}
    return SimpleNamespace(num_processes=2, gradient_accumulation_steps=1,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
                               deepspeed_config=config)))


@pytest.mark.parametrize("setting", [{"zero_hpz_partition_size": 2},
                                     {"zero_quantized_weights": True},
                                     {"offload_param": {"device": "nvme"}}])
def test_zero3_settings_the_ema_teacher_cannot_use_are_refused(tmp_path, setting) -> None:
    """They make ZeRO-3 gather from somewhere other than the partitions the EMA is written to."""
    from opsd_kernels.trainer import zero

    with pytest.raises(ValueError, match="teacher_mode: 'ema' under DeepSpeed ZeRO-3"):
        zero.configure(_zero3_accelerator(**setting), small_config(tmp_path, teacher_mode="ema"))
    for mode in ({"teacher_mode": "current"},  # they never write into the partitions
                 {"teacher_mode": "fixed", "lora": True, "lora_rank": 4}):
        zero.configure(_zero3_accelerator(**setting), small_config(tmp_path, **mode))
    zero.configure(_zero3_accelerator(offload_param={"device": "cpu"}),
                   small_config(tmp_path, teacher_mode="ema"))
