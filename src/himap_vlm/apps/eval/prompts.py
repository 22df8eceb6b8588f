"""Which prompt a model is asked: the task's protocol, or the model's own question convention.

A task's prompt is the question (as the data has it) plus, for most benchmarks, an answer-format
instruction the papers append (:meth:`~himap_vlm.apps.eval.tasks.base.Task.answer_instruction`:
LLaVA-1.5's "Answer the question using a single word or phrase.", ScienceQA's "Answer with the
option's letter from the given choices directly."). That instruction is right for the models the
papers evaluate and wrong for a model trained on another convention: the shipped tiny LLaVA was
trained on the bare synthetic questions, and its closed-vocabulary tokenizer turns the
short-answer instruction into unknown tokens (with it, its dense accuracy on the demo's 300
test questions is 21.0 % instead of 98.0 %).

The rule (``instructions="auto"``, the default of :func:`~himap_vlm.apps.eval.runner.evaluate`,
``himap eval`` and ``himap demo``):

1. a model that *declares* its question convention (``question_convention`` in its
   ``tokenizer_config.json`` or ``config.json``, see :mod:`himap_vlm.apps.prompting`) is asked
   that way: ``"plain"`` leaves the task's instructions out, ``"task"`` keeps them;
2. otherwise the task's instructions are appended (the papers' protocol) -- except an
   instruction the model's tokenizer cannot spell (a word it turns into its unknown token),
   which would reach the model as unknown tokens: it is left out.

``instructions="task"`` always appends them (the papers' protocol, whatever the model) and
``"none"`` never does. Only the task's appended instruction is affected: text that is part of the
data (a question that carries its own "Answer with the option's letter ..." line, a record's
``prompt``) is always sent as written. Every prediction records the prompt actually sent
(``prompt``: the user turn; ``instruction``: the instruction appended, or ``null``;
``input_text``: the text given to the processor, chat template included), and ``config.json``
records the rule (:meth:`PromptPolicy.to_dict`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from himap_vlm.apps.prompting import declared_question_convention, unreadable_words

if TYPE_CHECKING:
    from himap_vlm.apps.eval.tasks.base import Sample, Task

__all__ = ["INSTRUCTION_MODES", "PromptPolicy"]

INSTRUCTION_MODES = ("auto", "task", "none")
"""Values of ``instructions`` (see the module docstring)."""


class PromptPolicy:
    """The prompts one model is asked for one task (see the module docstring).

    Parameters
    ----------
    task : Task
        The task.
    processor
        The model's processor (its tokenizer spells the instructions; it may declare a convention).
    model : optional
        The model (its ``config`` may declare a convention).
    mode : {"auto", "task", "none"}
        ``instructions`` as given.

    Raises
    ------
    ValueError
        For an unknown mode or a declared convention that is not ``"task"`` or ``"plain"``.
    """

    def __init__(self, task: Task, processor: Any, model: Any = None, mode: str = "auto") -> None:
        if mode not in INSTRUCTION_MODES:
            raise ValueError(f"instructions must be one of {', '.join(INSTRUCTION_MODES)}; got {mode!r}")
        self.task = task
        self.processor = processor
        self.mode = mode
        self.declared = declared_question_convention(processor, model) if mode == "auto" else None
        if mode == "task":
            self.convention, self.source = "task", "instructions='task' (the task's instructions, always)"
        elif mode == "none":
            self.convention, self.source = "plain", "instructions='none' (questions as written, always)"
        elif self.declared is not None:
            self.convention, self.source = self.declared[0], f"declared by the model: {self.declared[1]}"
        else:
            self.convention = "task"
            self.source = (
                "the task's instructions (the model declares no question convention), except those its "
                "tokenizer cannot spell"
            )
        self._left_out: dict[str, str] = {}
        self._kept: set[str] = set()

    def _keeps(self, instruction: str) -> bool:
        if instruction in self._kept:
            return True
        if instruction in self._left_out:
            return False
        if self.convention == "plain":
            self._left_out[instruction] = self.source
            return False
        if self.mode == "auto" and self.declared is None:
            words = unreadable_words(self.processor, instruction)
            if words:
                self._left_out[instruction] = (
                    f"the model's tokenizer cannot spell {', '.join(repr(w) for w in words)} (they would reach "
                    "the model as unknown tokens)"
                )
                return False
        self._kept.add(instruction)
        return True

    def prompt(self, sample: Sample) -> tuple[str, str | None]:
        """The user-turn text for ``sample`` and the instruction it ends with (``None``: none appended)."""
        instruction = self.task.answer_instruction(sample)
        if instruction is None:
            return self.task.prompt(sample), None
        if self._keeps(instruction):
            return self.task.prompt(sample), instruction
        return self.task.prompt_without_instruction(sample), None

    def prompts(self, samples: Iterable[Sample]) -> list[tuple[str, str | None]]:
        """:meth:`prompt` of every sample."""
        return [self.prompt(s) for s in samples]

    @property
    def left_out(self) -> dict[str, str]:
        """Instructions left out so far, and why."""
        return dict(self._left_out)

    def to_dict(self) -> dict[str, Any]:
        """What ``config.json`` and the results record: mode, effective convention, why, what was left out."""
        return {
            "instructions": self.mode,
            "convention": self.convention,
            "source": self.source,
            "appended": sorted(self._kept),
            "left_out": dict(self._left_out),
        }

    def summary(self) -> str:
        """One line for the console."""
        return describe(self.to_dict())


def describe(prompting: dict[str, Any]) -> str:
    """One line from :meth:`PromptPolicy.to_dict` (as recorded)."""
    left_out = prompting.get("left_out") or {}
    appended = prompting.get("appended") or []
    if left_out:
        parts = [f"{ins!r} left out: {why}" for ins, why in left_out.items()]
        head = "prompts: the task's answer instruction" + ("s" if len(left_out) > 1 else "")
        return f"{head} {'; '.join(parts)}" + (f"; appended: {', '.join(map(repr, appended))}" if appended else "")
    if appended:
        return f"prompts: question + the task's instruction ({prompting.get('source', '')})"
    return "prompts: the questions as written (the task appends no instruction to them)"
