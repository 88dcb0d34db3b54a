"""What a row's text is made of: words, numbers (coordinates, number lists) or code and encoded data.

A datastore row can win a task's retrieval on surface likeness alone: navigate's inputs hold digits, so
lists of coordinates and numbers score high though they are nothing like a walk described in words.
Retrieval keeps only rows of a kind that one of the task's own example inputs has (`match_kind`)."""

from __future__ import annotations

import json
import re

from rebase.task import TaskSpec

KINDS = ("words", "numeric", "code")
_COORDINATE = re.compile(r"\(\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\)")
_NUMBER_LIST = re.compile(r"(?:-?\d+(?:\.\d+)?\s*[,;\s]\s*){4,}-?\d+")
_SYMBOLS = frozenset("[]{}<>=+*/\\|^~`#$%&_@")
_LONG_TOKEN = re.compile(r"\S{40,}")


def text_kind(text: str) -> str:
    """`numeric` when at least 40% of the non-space characters are digits, or the text holds a coordinate
    pair "(3, -4)" or "(-2.0, 1.5)", or a list of 5+ numbers; `code` when at least 25% are brackets,
    operators or symbols (sentence punctuation aside) or it has a run of 40+ characters without a space;
    else `words`."""
    characters = [c for c in text if not c.isspace()]
    if not characters:
        return "words"
    digits = sum(c.isdigit() for c in characters) / len(characters)
    if digits >= 0.4 or _COORDINATE.search(text) or _NUMBER_LIST.search(text):
        return "numeric"
    symbols = sum(c in _SYMBOLS for c in characters) / len(characters)
    if symbols >= 0.25 or _LONG_TOKEN.search(text):
        return "code"
    return "words"


def row_text(row: str) -> str:
    """A stored row (its JSON object) as one text: its values, joined."""
    return " ".join(str(value) for value in json.loads(row).values() if value is not None)


def task_kinds(task: TaskSpec) -> set[str]:
    """The kinds of the task's example inputs: the kinds of row retrieval keeps for it."""
    return {text_kind(example.input) for example in task.examples}
