"""TaskSpec: the task a student is trained for, read from a task YAML file (format in DESIGN.md)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class TaskSpec(StageConfig):
    """An instruction, 1 to 8 examples, optional labels, banned datasets and an optional eval source."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$")
    instruction: str
    examples: list[Example] = Field(min_length=1, max_length=8)
    labels: list[str] | None = Field(None, min_length=1)
    ban: list[str] = Field(default_factory=list, description="dataset ids (or id prefixes) never retrieved")
    eval: str | None = Field(None, description="held-out data for `rebase evaluate`, a datastore SPEC")

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
