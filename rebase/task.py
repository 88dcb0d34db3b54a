"""TaskSpec: the task a student is trained for, read from a task YAML file (format in DESIGN.md)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rebase.config import StageConfig, load_config


class Example(BaseModel):
    """One demonstration: an input and its output (which may carry a rationale ending in the answer)."""

    model_config = ConfigDict(extra="forbid")

    input: str
    output: str

    @field_validator("input", "output")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


class PromptTemplates(BaseModel):
    """Overrides of the teacher's prompts (`rebase.teacher.prompts`); each names its slots in braces."""

    model_config = ConfigDict(extra="forbid")

    transform: str | None = Field(None, description="slots: {instruction} {examples} {row} {format}; {row} required")
    judge: str | None = Field(None, description="slots: {instruction} {examples} {example}; {example} required")

    @field_validator("transform", "judge")
    @classmethod
    def _has_required_slot(cls, value: str | None, info: ValidationInfo) -> str | None:
        slot = {"transform": "{row}", "judge": "{example}"}[info.field_name]
        if value is not None and slot not in value:
            raise ValueError(f"the {info.field_name} template must contain {slot}")
        return value


class TaskSpec(StageConfig):
    """An instruction, 1 to 8 examples, optional labels, banned datasets and an optional eval source."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$")
    instruction: str
    examples: list[Example] = Field(min_length=1, max_length=8)
    labels: list[str] | None = Field(None, min_length=1)
    ban: list[str] = Field(default_factory=list, description="dataset ids (or id prefixes) never retrieved")
    eval: str | None = Field(None, description="held-out data for `rebase evaluate`, a datastore SPEC")
    eval_answers: dict[str, str] = Field(
        default_factory=dict, description="the eval source's answers as the task's labels, e.g. {True: 'Yes'}"
    )
    chain_of_thought: bool | None = Field(
        None, description="outputs carry reasoning ending in 'the answer is X'; default: true when every example does"
    )
    prompts: PromptTemplates = Field(default_factory=PromptTemplates)

    @property
    def reasons(self) -> bool:
        """True when the task's outputs are a rationale ending in a final answer (chain of thought)."""
        if self.chain_of_thought is not None:
            return self.chain_of_thought
        return all(split_rationale(example.output)[1] is not None for example in self.examples)

    @field_validator("instruction")
    @classmethod
    def _instruction_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (any(not label.strip() for label in value) or len(set(value)) != len(value)):
            raise ValueError("labels must be distinct and non-empty")
        return value

    @model_validator(mode="after")
    def _eval_answers_are_labels(self) -> TaskSpec:
        unknown = [value for value in self.eval_answers.values() if self.labels and value not in self.labels]
        if unknown:
            raise ValueError(f"eval_answers maps to {unknown[0]!r}, which is not one of the labels")
        return self

    @field_validator("ban")
    @classmethod
    def _bans_are_ids(cls, value: list[str]) -> list[str]:
        cleaned = [ban.strip().rstrip("/") for ban in value]
        if any(not ban for ban in cleaned):
            raise ValueError("a banned dataset id is empty")
        return cleaned


def load_task(path: Path) -> TaskSpec:
    """Read and validate a task file; a bad field is one RebaseError naming the file and the field."""
    return load_config(TaskSpec, Path(path))


def is_banned(dataset_id: str, bans: list[str]) -> bool:
    """True when `dataset_id` is a banned id or lies under one (`bigbench/navigate` bans
    `bigbench/navigate/sub` but not `bigbench/navigate_more`): whole path segments, never substrings."""
    return any(dataset_id == ban or dataset_id.startswith(ban + "/") for ban in bans)


_ANSWER = re.compile(r"(?:^|[\s.,;:!?])(?:so |thus |therefore |hence )?the (?:final )?answer is[:\s]*", re.IGNORECASE)


def split_rationale(text: str) -> tuple[str, str | None]:
    """(reasoning, final answer) of an output that ends "... So the answer is X."; (text, None) when none does.
    The last "answer is" counts; the answer loses surrounding quotes and a final full stop."""
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return text.strip(), None
    last = matches[-1]
    answer = text[last.end() :].strip()
    for _ in range(2):  # "'neutral'." and "'neutral.'" both give neutral
        answer = answer[:-1] if answer.endswith(".") else answer
        answer = answer.strip().strip("\"'`*").strip()
    return text[: last.start()].strip(), answer or None


def final_answer(text: str) -> str:
    """The answer an output gives: after the last "the answer is" when there is one, else the whole text."""
    reasoning, answer = split_rationale(text)
    return answer if answer is not None else reasoning


def normalise(text: str) -> str:
    """Text as compared for labels, copies and duplicates: lower case, letters and digits, single spaces."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer names, ignoring case, spacing and punctuation; None if none does."""
    key = normalise(answer)
    return next((label for label in labels if normalise(label) == key), None)


STUDENT_TEMPLATE = "### Instruction:\n{instruction}\n\n{examples}### Input:\n{input}\n\n### Response:\n"
STUDENT_STOP = ["\n###"]  # the format's next section starts here: a response never contains it


def student_prompt(task: TaskSpec, text: str, few_shot: bool = False) -> str:
    """The one prompt format the student is trained on, evaluated with and served behind (Alpaca-style,
    as in the paper): the task's instruction, optionally its few-shot examples, then the input. The
    response follows the prompt directly; training puts the loss on the response tokens only."""
    examples = ""
    if few_shot:
        shown = "\n\n".join(f"Input: {e.input}\nResponse: {e.output}" for e in task.examples)
        examples = f"### Examples:\n{shown}\n\n"
    return STUDENT_TEMPLATE.format(instruction=task.instruction, examples=examples, input=text.strip())
