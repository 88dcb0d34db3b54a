"""Metrics on known cases, and the student's prompt format."""

from __future__ import annotations

import pytest

from rebase.evaluate import exact_match, label_correct, normalise_answer, score, token_f1
from rebase.task import TaskSpec, student_prompt


def test_normalise_answer_as_squad_does():
    assert normalise_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalise_answer("An apple, a pear") == "apple pear"


def test_exact_match_uses_the_final_answer():
    assert exact_match("We reason a while. So the answer is Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("the Louvre", ["Orsay", "Louvre"]) == 1.0


def test_token_f1_hand_computed():
    # prediction tokens {cat, sat}; reference {cat, sat, down}: precision 1, recall 2/3, F1 0.8
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert token_f1("the cat sat", ["dog", "cat"]) == pytest.approx(2 / 3)  # best reference: p 1/2, r 1
    assert token_f1("", [""]) == 1.0
    assert token_f1("cat", [""]) == 0.0


def test_label_accuracy_on_chain_of_thought_outputs():
    labels = ["Yes", "No"]
    assert label_correct("We end at (0, 0). So the answer is yes.", "... So the answer is Yes.", labels) == 1.0
    assert label_correct("So the answer is No.", "So the answer is Yes.", labels) == 0.0
    assert label_correct("I cannot tell.", "So the answer is Yes.", labels) == 0.0


def test_score_picks_metrics_by_task():
    labelled = TaskSpec(name="t", instruction="i", examples=[{"input": "a", "output": "Yes"}], labels=["Yes", "No"])
    assert score(labelled, ["Yes", "so the answer is no", "maybe"], [["Yes"], ["Yes"], ["No"]]) == {
        "exact_match": 0.3333,
        "accuracy": 0.3333,
    }
    free = TaskSpec(name="t", instruction="i", examples=[{"input": "a", "output": "b"}])
    assert score(free, ["the cat sat", "Paris"], [["a cat sat down"], ["paris"]]) == {"exact_match": 0.5, "f1": 0.9}
    with pytest.raises(ValueError):
        score(free, [], [])


def test_student_prompt_format():
    task = TaskSpec(name="t", instruction="Say yes or no.", examples=[{"input": "Is ice cold?", "output": "Yes"}])
    assert student_prompt(task, " Is fire cold? ") == (
        "### Instruction:\nSay yes or no.\n\n### Input:\nIs fire cold?\n\n### Response:\n"
    )
    assert student_prompt(task, "Is fire cold?", few_shot=True) == (
        "### Instruction:\nSay yes or no.\n\n### Examples:\nInput: Is ice cold?\nResponse: Yes\n\n"
        "### Input:\nIs fire cold?\n\n### Response:\n"
    )
