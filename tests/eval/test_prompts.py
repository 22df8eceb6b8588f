"""The prompt rule (:mod:`himap_vlm.apps.eval.prompts`): the task's instruction vs the model's own convention."""

from __future__ import annotations

import json
import shutil

import pytest
from _runner_helpers import single_thread, tiny_eval_env

from himap_vlm.apps.eval import Sample, get_task
from himap_vlm.apps.eval.prompts import PromptPolicy
from himap_vlm.apps.eval.runner import PREDICTIONS, evaluate, read_predictions
from himap_vlm.apps.eval.tasks.base import SHORT_ANSWER_INSTRUCTION
from himap_vlm.apps.prompting import declared_question_convention, unreadable_words

MC = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_eval_env(tmp_path_factory)


class _Tok:
    """A stand-in tokenizer: words outside ``vocab`` become the unknown token (id 1)."""

    unk_token_id = 1

    def __init__(self, vocab, declared=None):
        self.vocab = set(vocab)
        self.init_kwargs = {} if declared is None else {"question_convention": declared}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5 if text in self.vocab else 1]}


class _Proc:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


CLOSED = _Proc(_Tok("Is there a red circle ? Answer with the option's letter from given choices directly .".split()))
OPEN = _Proc(_Tok([], None))
OPEN.tokenizer.unk_token_id = None  # a byte-level tokenizer spells everything


def _samples():
    return [
        Sample("a", None, "Is there a red circle?", "yes", {"family": "exists"}),
        Sample("b", None, "What color?\nA. red\nB. blue", "A", {"family": "choice"}),
        Sample("c", None, f"Which?\nA. x\nB. y\n{MC}", "A", {"family": "choice"}),  # carries its own
    ]


def test_tasks_name_the_instruction_they_append():
    syn = get_task("synthetic")
    a, b, c = _samples()
    assert syn.answer_instruction(a) == SHORT_ANSWER_INSTRUCTION
    assert syn.prompt_without_instruction(a) == "Is there a red circle?"
    assert syn.answer_instruction(b) == MC and syn.prompt(b).endswith("\n" + MC)
    assert syn.answer_instruction(c) is None and syn.prompt(c) == c.question  # data, not the task's
    pope = get_task("pope")
    assert pope.answer_instruction(a) == SHORT_ANSWER_INSTRUCTION
    assert pope.prompt_without_instruction(a) == a.question
    sqa = get_task("scienceqa_img")
    s = Sample("s", None, "Which?", "A", {"choices": ["x", "y"]})
    assert sqa.answer_instruction(s) == MC and sqa.prompt_without_instruction(s) == "Which?\nA. x\nB. y"
    caption = get_task("nocaps")
    assert caption.answer_instruction(Sample("n", None, "", ["a cat"])) is None  # the prompt is the request


def test_rule_auto_task_none_and_declared_conventions():
    syn = get_task("synthetic")
    a, b, c = _samples()
    # auto, nothing declared: the task's instruction unless the tokenizer cannot spell it
    auto = PromptPolicy(syn, CLOSED)
    assert auto.prompt(a) == ("Is there a red circle?", None)
    assert auto.prompt(b) == (syn.prompt(b), MC)
    assert auto.prompt(c) == (c.question, None)
    assert list(auto.left_out) == [SHORT_ANSWER_INSTRUCTION]
    assert "cannot spell 'question', 'using'" in auto.left_out[SHORT_ANSWER_INSTRUCTION]
    assert auto.to_dict()["appended"] == [MC]
    # a tokenizer that spells everything: the papers' protocol
    assert PromptPolicy(syn, OPEN).prompt(a) == (syn.prompt(a), SHORT_ANSWER_INSTRUCTION)
    # explicit modes
    assert PromptPolicy(syn, CLOSED, mode="task").prompt(a) == (syn.prompt(a), SHORT_ANSWER_INSTRUCTION)
    assert PromptPolicy(syn, OPEN, mode="none").prompt(b) == ("What color?\nA. red\nB. blue", None)
    # a declared convention wins over the tokenizer test, in both directions
    plain = _Proc(_Tok([], "plain"))
    plain.tokenizer.unk_token_id = None
    assert PromptPolicy(syn, plain).prompt(a) == ("Is there a red circle?", None)
    assert "question_convention='plain'" in PromptPolicy(syn, plain).source
    task = _Proc(_Tok(["Is"], "task"))
    assert PromptPolicy(syn, task).prompt(a) == (syn.prompt(a), SHORT_ANSWER_INSTRUCTION)
    with pytest.raises(ValueError, match="question_convention='bogus'"):
        PromptPolicy(syn, _Proc(_Tok([], "bogus")))
    with pytest.raises(ValueError, match="instructions must be one of"):
        PromptPolicy(syn, OPEN, mode="sometimes")


def test_convention_declared_in_the_model_files_travels_with_them(env, tmp_path):
    """``question_convention`` in tokenizer_config.json survives save/load of the processor."""
    from transformers import AutoProcessor

    assert declared_question_convention(env.processor) is None
    assert unreadable_words(env.processor, SHORT_ANSWER_INSTRUCTION)  # the tiny tokenizer's vocabulary is closed
    folder = tmp_path / "declared"
    shutil.copytree(env.model_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["question_convention"] = "task"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    processor = AutoProcessor.from_pretrained(folder)
    assert declared_question_convention(processor) == (
        "task",
        "question_convention='task' in the model's tokenizer_config.json",
    )
    processor.save_pretrained(tmp_path / "again")
    assert declared_question_convention(AutoProcessor.from_pretrained(tmp_path / "again"))[0] == "task"


def test_predictions_record_the_prompt_sent_and_resuming_with_other_prompts_is_refused(env, tmp_path):
    task = get_task("synthetic")
    samples = task.load(env.data_dir, limit=4)
    results = evaluate(env.model, env.processor, task, samples, "dense", tmp_path, batch_size=2, max_new_tokens=1)
    records = read_predictions(results.configs[0].directory / PREDICTIONS)
    for s, rec in zip(samples, records, strict=True):
        assert set(rec) >= {"prompt", "instruction", "input_text"}
        if task.answer_instruction(s) == SHORT_ANSWER_INSTRUCTION:
            assert rec["prompt"] == s.question and rec["instruction"] is None  # left out: unspellable
        assert s.question.split("\n")[0] in rec["input_text"] and "<image>" in rec["input_text"]
    assert results.prompting["left_out"] and results.prompting["instructions"] == "auto"
    config = json.loads((results.configs[0].directory / "config.json").read_text())
    assert config["prompting"] == results.prompting
    summary = json.loads((results.directory / "summary.json").read_text())
    assert summary["prompting"] == results.prompting
    with pytest.raises(ValueError, match="predictions made with another prompt"):
        evaluate(
            env.model, env.processor, task, samples, "dense", tmp_path, max_new_tokens=1, instructions="task"
        )
    again = evaluate(env.model, env.processor, task, samples, "dense", tmp_path, max_new_tokens=1)
    assert again.configs[0].samples_per_second is None  # same prompts: resumed, nothing to redo


def test_shipped_tiny_llava_declares_its_plain_convention():
    """The convention travels with the model: its tokenizer_config.json says 'plain'."""
    from transformers import AutoProcessor

    from himap_vlm.apps.prompting import declared_question_convention
    from himap_vlm.models import named_model_path

    processor = AutoProcessor.from_pretrained(named_model_path("tiny-llava"))
    assert declared_question_convention(processor)[0] == "plain"
