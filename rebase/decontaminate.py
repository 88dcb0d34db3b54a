"""Decontamination: retrieved rows and generated examples compared with the task's evaluation set.

Banning the task's own dataset is not enough: its items (or near copies) can sit in other datasets of the
store, and a teacher can write out benchmark items it memorised. Two checks, as large-model papers run them:

- **long n-gram overlap**: `n` (13, or more where the evaluation inputs share 13-word runs among
  themselves: `derived_ngram`) consecutive words in common with an evaluation input, after
  `normalise` (lower case, letters and digits); an evaluation input of `MIN_WORDS` (8) to `n` words
  matches a retrieved row that holds the whole of it, and a generated input that is it (GPT-3's rule:
  n-grams no shorter than 8 words); shorter ones are left to the embeddings, as a few words in common say
  nothing;
- **embedding near-duplicates**: cosine similarity to the nearest evaluation input at or above a threshold
  derived from the evaluation set itself: the 99th percentile of each of its inputs' similarity to its
  nearest other input (a text closer to an evaluation item than evaluation items are to one another), and
  never below `SIMILARITY_FLOOR`. A task whose inputs are all alike (navigate's walks) gets a threshold near
  1, so only the n-grams speak for it; the threshold used is recorded.

The stages call `EvalSet.build` once and `EvalSet.match` on their texts; `rebase retrieve` marks matching
rows (`contaminated`, `contamination` in rows.parquet), `rebase transform` never sends them to the teacher
and gives a matching generated example the status `contaminated`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rebase.task import TaskSpec, normalise

if TYPE_CHECKING:
    from rebase.config import DecontaminationConfig

CONTAMINATED = "contaminated"  # the status, and the prefix of its reason
SIMILARITY_FLOOR = 0.9
MIN_WORDS = 8
QUANTILE = 99
_SHOWN = 80  # characters of the matched evaluation input in a reason


def words(text: str) -> tuple[str, ...]:
    return tuple(normalise(text).split())


@dataclass
class EvalSet:
    """The evaluation inputs, their n-grams and vectors, and the similarity threshold derived from them."""

    inputs: list[str]
    n: int
    threshold: float
    vectors: np.ndarray
    grams: dict[tuple[str, ...], int] = field(default_factory=dict)  # n-gram -> first input holding it
    short: dict[int, dict[tuple[str, ...], int]] = field(default_factory=dict)  # length -> whole input -> index

    @classmethod
    def build(
        cls,
        inputs: list[str],
        embed: Callable[[list[str]], np.ndarray],
        n: int = 13,
        similarity: float | None = None,
    ) -> EvalSet:
        """Index `inputs` (n-grams) and embed them (unit vectors); `similarity` fixes the threshold."""
        grams: dict[tuple[str, ...], int] = {}
        short: dict[int, dict[tuple[str, ...], int]] = {}
        tokenised = [words(text) for text in inputs]
        n = derived_ngram(tokenised, n)
        for index, tokens in enumerate(tokenised):
            if MIN_WORDS <= len(tokens) < n:
                short.setdefault(len(tokens), {}).setdefault(tokens, index)
            for start in range(len(tokens) - n + 1):
                grams.setdefault(tokens[start : start + n], index)
        vectors = embed(inputs) if inputs else np.zeros((0, 1), np.float32)
        threshold = similarity if similarity is not None else derived_threshold(vectors)
        return cls(inputs, n, threshold, vectors, grams, short)

    def match(self, texts: list[str], vectors: np.ndarray, within: bool = True) -> list[str | None]:
        """Per text, why it copies an evaluation input ("13-gram overlap with eval input '...'", "similarity
        0.953 to eval input '...'"), or None for a clean one. `vectors`: the texts' unit vectors."""
        near = self.near(vectors)
        return [self.overlap(text, within) or reason for text, reason in zip(texts, near)]

    def match_rows(self, rows: list[str], encode: Callable[[list[str]], np.ndarray]) -> list[str | None]:
        """Per stored row (a JSON object), why it copies an evaluation input, or None: its text (its values
        joined) shares a long n-gram with one or holds a whole short one, or one of its values is a
        near-duplicate of one. Only the values of rows the n-grams leave are embedded, each once."""
        values = [[str(v) for v in json.loads(row).values() if v is not None and str(v).strip()] for row in rows]
        reasons = [self.overlap(" ".join(row)) for row in values]
        distinct = sorted({value for n, row in enumerate(values) if reasons[n] is None for value in row})
        near = dict(zip(distinct, self.near(encode(distinct)))) if distinct else {}
        for n, row in enumerate(values):
            reasons[n] = reasons[n] or next((near[value] for value in row if near.get(value)), None)
        return reasons

    def near(self, vectors: np.ndarray) -> list[str | None]:
        """Per vector, "similarity S to eval input '...'" where S reaches the threshold, else None."""
        reasons: list[str | None] = [None] * len(vectors)
        if not len(self.vectors):
            return reasons
        for start in range(0, len(vectors), 1024):
            block = vectors[start : start + 1024] @ self.vectors.T
            for offset, (index, score) in enumerate(zip(block.argmax(axis=1).tolist(), block.max(axis=1).tolist())):
                if score >= self.threshold:
                    reasons[start + offset] = f"similarity {score:.3f} to eval input {self._shown(index)}"
        return reasons

    def overlap(self, text: str, within: bool = True) -> str | None:
        """Why `text` shares a long n-gram with an evaluation input, or holds the whole of a short one
        (`within`; else only when it is that input), or None. A retrieved row is checked `within`: it may
        hold an input beside its answer. A generated input is one input: in a task whose inputs are all
        alike (navigate's walks), a new one often holds an evaluation input and goes on, a different item."""
        tokens = words(text)
        for start in range(len(tokens) - self.n + 1):
            index = self.grams.get(tokens[start : start + self.n])
            if index is not None:
                return f"{self.n}-gram overlap with eval input {self._shown(index)}"
        if not within:
            index = self.short.get(len(tokens), {}).get(tokens)
            return None if index is None else f"is eval input {self._shown(index)}"
        for length, whole in self.short.items():
            for start in range(len(tokens) - length + 1):
                index = whole.get(tokens[start : start + length])
                if index is not None:
                    return f"holds the whole of eval input {self._shown(index)}"
        return None

    def _shown(self, index: int) -> str:
        text = " ".join(self.inputs[index].split())
        return repr(text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "...")


def derived_ngram(tokenised: list[tuple[str, ...]], least: int) -> int:
    """The n-gram length, from the evaluation inputs themselves: the smallest n from `least` up at which at
    most 1% of them share an n-gram with another of them. Where the inputs are formulaic (navigate's walks:
    "take 3 steps right take 8 steps right ..."), different items share 13-word runs, so 13 words in common
    say nothing about copying; the length grows until a shared run singles out one item, and inputs shorter
    than it are matched whole. Never beyond the longest input plus one (then every input is matched whole)."""
    longest = max((len(tokens) for tokens in tokenised), default=0)
    for n in range(least, longest + 1):
        owner: dict[tuple[str, ...], int] = {}
        shared: set[int] = set()
        for index, tokens in enumerate(tokenised):
            for gram in {tokens[start : start + n] for start in range(len(tokens) - n + 1)}:
                first = owner.setdefault(gram, index)
                if first != index:
                    shared.update((first, index))
        if len(shared) <= 0.01 * len(tokenised):
            return n
    return max(least, longest + 1)


def derived_threshold(vectors: np.ndarray) -> float:
    """The `QUANTILE`th percentile of the evaluation inputs' similarity to their nearest other input, at
    least `SIMILARITY_FLOOR` (and the floor alone for a set of one)."""
    if len(vectors) < 2:
        return SIMILARITY_FLOOR
    nearest = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), 1024):
        block = vectors[start : start + 1024] @ vectors.T
        rows = np.arange(start, start + len(block))
        block[rows - start, rows] = -np.inf  # not an input's similarity to itself
        nearest[start : start + len(block)] = block.max(axis=1)
    return float(min(1.0, max(SIMILARITY_FLOOR, np.percentile(nearest, QUANTILE))))


def eval_inputs(task: TaskSpec) -> list[str]:
    """The inputs of the task's whole evaluation source (every held-out example, not only a sample)."""
    from rebase.evaluate import read_eval_set

    return [example["input"] for example in read_eval_set(task.eval, task)] if task.eval else []


def settings(config: DecontaminationConfig) -> dict:
    """The settings a stage's fingerprint holds while decontamination is on."""
    return {"ngram": config.contamination_ngram, "similarity": config.contamination_similarity}


def summary(eval_set: EvalSet | None, reasons: list[str | None]) -> dict:
    """stats.json's `contamination`: how many matched, by which check, against what."""
    if eval_set is None:
        return {"checked": False, "why": "the task names no evaluation source (eval)"}
    found = [reason for reason in reasons if reason]
    return {
        "checked": True,
        "eval_inputs": len(eval_set.inputs),
        "ngram": eval_set.n,
        "similarity_threshold": round(eval_set.threshold, 4),
        "contaminated": len(found),
        "by_ngram": sum(not reason.startswith("similarity") for reason in found),
        "by_similarity": sum(reason.startswith("similarity") for reason in found),
    }


def describe(found: dict | None, what: str) -> str:
    """The decontamination's one sentence for a stage (report and model card)."""
    if not found:
        return "Not compared with the evaluation set (made before decontamination)."
    if not found.get("checked"):
        return f"Not compared with the evaluation set: {found.get('why')}."
    line = (
        f"Compared with the task's {found['eval_inputs']:,} evaluation inputs: {found['contaminated']:,} {what} "
        f"copy one ({found['by_ngram']:,} by a {found['ngram']}-gram in common, {found['by_similarity']:,} by "
        f"embedding similarity of {found['similarity_threshold']} or more)"
    )
    if found.get("rows_not_sent"):
        line += f"; {found['rows_not_sent']:,} retrieved rows that copy one were never sent to the teacher"
    return line + "."
