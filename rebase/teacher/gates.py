"""Data gates: checks on the teacher's `ok` records that need more than one record at a time.

`rebase.teacher.parse` checks each answer on its own (JSON, labels, copies, exact duplicates). The gates
here stop garbage that passes those checks, whatever the teacher (DESIGN.md):
- task fit: the generated input must be about as close to the task's example inputs (cosine of their
  embeddings) as those inputs are to each other, and the reasoning must not conclude another answer;
- near duplicates: an input whose embedding is almost that of a better-ranked `ok` input;
- answer consistency: the teacher answers its own input again, few-shot, and must agree with itself;
- label balance: no label takes more than a set share of the `ok` records.
Each gate turns a record into `rejected` (or `duplicate`) with a reason that starts with the gate's name,
so records.parquet says which gate removed what. Every function is plain: records in, records changed.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from rebase.task import TaskSpec, final_answer, match_label, normalise, split_rationale

OFF_TASK = "off task"
CONTRADICTS = "reasoning contradicts the answer"
NEAR_DUPLICATE = "near duplicate"
INCONSISTENT = "inconsistent"
UNBALANCED = "label balance"
GATES = (OFF_TASK, CONTRADICTS, NEAR_DUPLICATE, INCONSISTENT, UNBALANCED)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def fit_threshold(example_vectors: np.ndarray, margin: float) -> float | None:
    """The least similarity a generated input needs, from the task's own example inputs: each example's
    similarity to its nearest other example, the lowest of those, less `margin`. None with one example."""
    if len(example_vectors) < 2:
        return None
    similarities = example_vectors @ example_vectors.T
    np.fill_diagonal(similarities, -np.inf)
    return float(similarities.max(axis=1).min()) - margin


def task_fit(records: list[dict], vectors: np.ndarray, example_vectors: np.ndarray, threshold: float) -> None:
    """Reject `ok` records whose input (row i of `vectors`, unit length) is less similar than `threshold`
    to every example input."""
    similarity = (vectors @ example_vectors.T).max(axis=1) if len(records) else np.zeros(0)
    for record, value in zip(records, similarity):
        if record["status"] == "ok" and value < threshold:
            record.update(
                status="rejected",
                reason=f"{OFF_TASK}: input similarity {value:.2f} to the task's examples is below {threshold:.2f}",
            )


def conclusion_markers(task: TaskSpec) -> dict[str, set[str]]:
    """Per label, the words that the last sentence of every example's reasoning with that label has and
    no example with another label has in its last sentence (navigate: No -> {not}, Yes -> {back})."""
    if not (task.labels and task.reasons):
        return {}
    endings: dict[str, list[set[str]]] = {}
    for example in task.examples:
        reasoning, answer = split_rationale(example.output)
        label = match_label(answer or "", task.labels)
        if label is not None:
            endings.setdefault(label, []).append(_words(_last_sentence(reasoning)))
    markers = {}
    for label, sentences in endings.items():
        others = set().union(*(words for other, group in endings.items() if other != label for words in group))
        markers[label] = set.intersection(*sentences) - others
    return {label: words for label, words in markers.items() if words}


def contradiction(task: TaskSpec, markers: dict[str, set[str]], record: dict) -> str | None:
    """Why a record's reasoning does not end in the answer it states, or None. Two signs: the reasoning
    itself says "the answer is Y" for another Y, or its last sentence with a conclusion marker has the
    markers of another label and none of its own."""
    reasoning, answer = record.get("reasoning"), record.get("answer")
    if not reasoning or not answer:
        return None
    stated = split_rationale(reasoning)[1]
    if stated is not None:
        named = match_label(stated, task.labels) if task.labels else stated
        if named is not None and normalise(named) != normalise(answer):
            return f"{CONTRADICTS}: the reasoning says the answer is '{named}', the record '{answer}'"
    if not markers:
        return None
    for sentence in reversed(_SENTENCE_END.split(reasoning)):
        words = _words(sentence)
        if not any(words & marker for marker in markers.values()):
            continue
        if words & markers.get(answer, set()):
            return None
        concluded = next(label for label, marker in markers.items() if words & marker)
        return f"{CONTRADICTS}: the reasoning ends toward '{concluded}', the record says '{answer}'"
    return None


def near_duplicates(records: list[dict], vectors: np.ndarray, threshold: float) -> None:
    """Mark `ok` records whose input is at least `threshold` similar to a better-ranked `ok` input."""
    kept: list[int] = []
    for n, record in enumerate(records):
        if record["status"] != "ok":
            continue
        if kept:
            similarity = vectors[kept] @ vectors[n]
            best = int(np.argmax(similarity))
            if similarity[best] >= threshold:
                record.update(
                    status="duplicate",
                    reason=f"{NEAR_DUPLICATE}: of row {records[kept[best]]['row_uid']} "
                    f"(similarity {similarity[best]:.2f})",
                )
                continue
        kept.append(n)


def second_answer(task: TaskSpec, text: str) -> str | None:
    """The answer the teacher's second pass gives: a label for label tasks, else its final answer."""
    from rebase.evaluate import predicted_label

    if task.labels:
        return predicted_label(text, task.labels)
    answer = final_answer(text).strip()
    return answer.splitlines()[0].strip() if answer else None


def consistency(task: TaskSpec, record: dict, text: str) -> None:
    """Reject an `ok` record when the teacher, asked its own input again, gives another answer."""
    again = second_answer(task, text)
    stated = record["answer"] if record.get("answer") is not None else record["output"]
    if again is None:
        record.update(status="rejected", reason=f"{INCONSISTENT}: asked again, the teacher gives no answer")
    elif normalise(again) != normalise(stated):
        record.update(
            status="rejected", reason=f"{INCONSISTENT}: asked again, the teacher answers '{again[:40]}', not '{stated}'"
        )


def balance_labels(records: list[dict], max_share: float) -> None:
    """Reject the worst-ranked `ok` records of any label above `max_share` of the `ok` records (records
    are best-ranked first); a set where one label is all there is keeps none of it."""
    if max_share >= 1:
        return
    while True:
        counts = Counter(r["answer"] for r in records if r["status"] == "ok")
        total = sum(counts.values())
        over = [(label, n) for label, n in counts.most_common() if n > max_share * total]
        if not over:
            return
        label, count = over[0]
        others = total - count
        allowed = math.floor(max_share * others / (1 - max_share) + 1e-9)
        surplus = [r for r in records if r["status"] == "ok" and r["answer"] == label][allowed:]
        for record in surplus:
            record.update(
                status="rejected",
                reason=f"{UNBALANCED}: '{label}' would be over {max_share:.0%} of the ok records",
            )


def gate_counts(records: list[dict]) -> dict[str, int]:
    """How many records each gate removed."""
    counts = Counter(gate for r in records if r["reason"] for gate in GATES if r["reason"].startswith(gate))
    return {gate: counts.get(gate, 0) for gate in GATES}


def _last_sentence(text: str) -> str:
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]
    return sentences[-1] if sentences else ""


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))
