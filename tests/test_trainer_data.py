"""Config parsing and checks, data loading, prompts and answer grading of the trainer."""

from __future__ import annotations

import json

import pytest
from trainer_fixtures import small_config

from opsd_kernels.trainer import OPSDConfig, load_problems
from opsd_kernels.trainer.answers import is_correct, last_boxed
from opsd_kernels.trainer.prompts import PromptEncoder
from opsd_kernels.trainer.tiny import arithmetic_problems, tiny_tokenizer

# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"learnig_rate": 1e-5}, "unknown field 'learnig_rate'; did you mean 'learning_rate'"),
    ({"max_steps": "ten"}, r"config.max_steps: expected an integer"),
    ({"max_steps": 0}, r"config.max_steps: must be > 0"),
    ({"lora": "yes"}, r"config.lora: expected true or false"),
    ({"teacher_mode": "frozen"}, r"config.teacher_mode: expected one of"),
    ({"teacher_mode": "fixed"}, r"config.teacher_mode: 'fixed' .* set lora: true"),
    ({"beta": 1.5}, r"config.beta: must lie in \[0, 1\]"),
    ({"ema_decay": 1.0}, r"config.ema_decay"),
    ({"teacher_template": "{problem} only"}, r"must contain \{solution\}"),
    ({"student_template": "{problem} {answer}"}, r"unknown placeholder\(s\) \['answer'\]"),
    ({"student_template": "{problem} {"}, r"not a valid format string"),
    ({"divergence": "sampled", "loss_top_k": 5}, r"config.loss_top_k"),
])
def test_bad_configs_name_the_field(values, message) -> None:
    with pytest.raises(ValueError, match=message):
        OPSDConfig.from_dict(values)


@pytest.mark.parametrize("name", ["low_memory_single_gpu.yaml", "sft_baseline.yaml"])
def test_shipped_configs_are_valid(name) -> None:
    from pathlib import Path

    import opsd_kernels.trainer

    path = Path(opsd_kernels.trainer.__file__).parent / "configs" / name
    config = OPSDConfig.from_yaml(path, {"max_steps": 3})
    assert config.max_steps == 3 and config.train_data == "data/train.jsonl"


def test_yaml_must_be_a_mapping(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        OPSDConfig.from_yaml(path)


# --- data ----------------------------------------------------------------------------------


ROWS = [{"q": "What is 1+2?", "sol": "1+2=3, \\boxed{3}", "ans": "3"},
        {"q": "What is 2+2?", "sol": "so \\boxed{4}", "ans": None}]


def _columns(**extra):
    return {"problem_column": "q", "solution_column": "sol", "answer_column": "ans", **extra}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk", "memory"])
def test_every_source_format_loads_the_same_problems(tmp_path, fmt) -> None:
    import datasets

    if fmt == "jsonl":
        source = tmp_path / "d.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "parquet":
        source = tmp_path / "d.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(source))
    elif fmt == "disk":
        source = tmp_path / "d"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
            str(source))
    else:
        source = ROWS
    got = load_problems(source, **_columns())
    assert [(p.problem, p.answer) for p in got] == [("What is 1+2?", "3"), ("What is 2+2?", "4")]


def test_answers_fall_back_to_the_solutions_boxed_answer() -> None:
    got = load_problems([{"problem": "p", "solution": "x \\boxed{\\frac{1}{2}} y"}])
    assert got[0].answer == "\\frac{1}{2}"


@pytest.mark.parametrize("source, message", [
    ("missing.jsonl", "does not exist"),
    ("data.csv", "unknown format '.csv'"),
])
def test_bad_sources(tmp_path, source, message) -> None:
    path = tmp_path / source
    if source.endswith(".csv"):
        path.write_text("a,b\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_problems(path)


def test_missing_column_lists_the_columns() -> None:
    with pytest.raises(ValueError, match=r"no column 'problem' \(columns: \['q', 'sol'\]\)"):
        load_problems([{"q": "a", "sol": "b"}])


# --- prompts -------------------------------------------------------------------------------


def test_prompts_share_a_head_and_follow_the_templates(tmp_path) -> None:
    tok = tiny_tokenizer()
    encoder = PromptEncoder(tok, small_config(tmp_path, max_new_tokens=40))
    [item] = load_problems(arithmetic_problems(1, seed=3))
    encoded = encoder.encode(item)
    assert tok.decode(encoded.student) == f"Q: {item.problem}\nA: "
    assert tok.decode(encoded.teacher) == f"Q: {item.problem}\nRef: {item.solution}\nA: "
    assert tok.decode(encoded.teacher[: encoded.head_length]) == f"Q: {item.problem}\n"
    assert encoded.target[-1] == tok.eos_token_id and not encoded.truncated


def test_head_leaves_each_prompt_a_token_of_its_own(tmp_path) -> None:
    config = small_config(tmp_path, student_template="{problem}",
                          teacher_template="{problem}{solution}")
    encoded = PromptEncoder(tiny_tokenizer(), config).encode(load_problems(
        [{"problem": "abc", "solution": "d"}])[0])
    assert encoded.head_length == 2  # "abc" is all the student has; it keeps its last token


def test_chat_template_wraps_both_prompts(tmp_path) -> None:
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    config = small_config(tmp_path, system_prompt="Be brief.")
    encoded = PromptEncoder(tok, config).encode(load_problems(
        [{"problem": "1+1?", "solution": "\\boxed{2}"}])[0])
    assert tok.decode(encoded.student) == "<system>Be brief.\n<user>Q: 1+1?\nA: \n<assistant>"
    assert tok.decode(encoded.teacher).startswith("<system>Be brief.\n<user>Q: 1+1?\nRef: ")
    with pytest.raises(ValueError, match="no chat template"):
        PromptEncoder(tiny_tokenizer(), small_config(tmp_path, chat_template=True))


def test_truncation_cuts_the_solution_and_skip_drops_the_row(tmp_path) -> None:
    rows = [{"problem": "1+1?", "solution": "s" * 80, "answer": "2"}]
    tok = tiny_tokenizer()
    cut = PromptEncoder(tok, small_config(tmp_path, max_prompt_length=40)).encode(
        load_problems(rows)[0])
    assert cut.truncated and len(cut.teacher) == 40
    assert tok.decode(cut.teacher).endswith("s\nA: ")  # the transition survives the cut
    skipped = PromptEncoder(tok, small_config(tmp_path, max_prompt_length=40,
                                              overlong="skip")).encode(load_problems(rows)[0])
    assert skipped is None


# --- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{12}.", "12"),
    ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("no answer", None),
    ("cut \\boxed{12", None),
])
def test_last_boxed(text, expected) -> None:
    assert last_boxed(text) == expected


def test_grading() -> None:
    assert is_correct("x \\boxed{ 132 }", "132")
    assert not is_correct("x \\boxed{131}", "132")
    assert not is_correct("no box 132", "132")
    assert not is_correct("\\boxed{1}", None)
