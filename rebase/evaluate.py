"""Scoring a student's outputs: metrics as plain functions (the evaluation stage builds on these).

- exact match after SQuAD-style normalisation (lower case, no punctuation, no articles, single spaces);
- accuracy against the task's labels, on the final answer (the text after the last "the answer is" for
  chain-of-thought outputs, else the whole output);
- SQuAD-style token F1 for extractive QA, the best over the references.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from rebase.task import TaskSpec, final_answer, match_label

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the prediction's final answer equals any reference's after normalisation."""
    answer = normalise_answer(final_answer(prediction))
    return float(any(answer == normalise_answer(final_answer(ref)) for ref in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD F1: token overlap of the prediction's final answer with the best-matching reference."""
    predicted = normalise_answer(final_answer(prediction)).split()
    best = 0.0
    for reference in references:
        expected = normalise_answer(final_answer(reference)).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def label_correct(prediction: str, reference: str, labels: list[str]) -> float:
    """1.0 when the prediction's final answer names the same label as the reference's."""
    predicted = match_label(final_answer(prediction), labels)
    expected = match_label(final_answer(reference), labels)
    return float(predicted is not None and predicted == expected)


def score(task: TaskSpec, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean metrics over examples: exact match always, accuracy on labels when the task has labels,
    F1 when it has none (free-text answers such as extractive QA)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one list of references per prediction, and at least one prediction")
    count = len(predictions)
    metrics = {"exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / count}
    if task.labels:
        metrics["accuracy"] = sum(label_correct(p, r[0], task.labels) for p, r in zip(predictions, references)) / count
    else:
        metrics["f1"] = sum(token_f1(p, r) for p, r in zip(predictions, references)) / count
    return {name: round(value, 4) for name, value in metrics.items()}
