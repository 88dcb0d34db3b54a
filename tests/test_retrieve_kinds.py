"""What a row's text is made of (rebase/retrieve/kinds.py), on rows BIG-bench retrieved for navigate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rebase.retrieve.kinds import row_text, task_kinds, text_kind
from rebase.task import load_task

TASKS = Path(__file__).parents[1] / "jobs" / "tasks"


@pytest.mark.parametrize(
    "text, kind",
    [
        ("Take 1 step forward. Take 10 steps left. Take 4 steps forward.", "words"),  # navigate's own input
        ("(-2, 5), (3, 1), (7, -4)", "numeric"),  # coordinate pairs
        ("There is a line segment from (-2.0, -1.1) to (1.5, 2.7). How many intersections?", "numeric"),
        ("[3, 8, 1, 0, 9] -> [9, 0, 1, 8, 3]", "numeric"),  # list_functions: a list of 5+ numbers
        ("12 + 7 = 19", "numeric"),  # 4 digits of 7 characters
        ("1. e4 e5 2. Nf3 Nc6 3. Bb5", "numeric"),  # checkmate_in_one: chess notation, 8 digits of 19
        ("not ( True ) and ( False or True ) is", "words"),
        ("{{<[]>}} [ < > ] { }", "code"),  # dyck languages: brackets
        ("aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZW5jb2RlZCB0ZXh0Lg==", "code"),  # a 40+ character token
        ("", "words"),
    ],
)
def test_text_kind(text, kind):
    assert text_kind(text) == kind


def test_row_text_joins_the_values():
    assert row_text(json.dumps({"input": "Take 3 steps.", "target": None, "score": 1})) == "Take 3 steps. 1"


def test_task_kinds_are_those_of_the_example_inputs():
    assert task_kinds(load_task(TASKS / "navigate.yaml")) == {"words"}
    assert task_kinds(load_task(TASKS / "boolean_expressions.yaml")) == {"words"}
