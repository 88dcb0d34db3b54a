"""The ReBase score (Ge et al. 2024) as plain functions on numpy arrays, with bans and row selection.

For a task with instruction I and examples (x_j, y_j), a row r of dataset D scores
    score(r) = ( max_cells mean_j s(x_j, c) + max_cells mean_j s(y_j, c) + s(I, description(D)) ) / 3
With unit vectors, mean_j s(x_j, c) = (mean_j e(x_j)) . e(c): one dot product with the mean example
vector per cell, so a task needs two cell queries and one dataset query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rebase.task import TaskSpec, is_banned

__all__ = ["TaskQuery", "cell_similarities", "is_banned", "rebase_scores", "row_maxima", "select_rows", "task_query"]


@dataclass(frozen=True)
class TaskQuery:
    """The three query vectors of a task: mean example input, mean example output, instruction."""

    input: np.ndarray
    output: np.ndarray
    instruction: np.ndarray


def task_query(task: TaskSpec, encode: Callable[[list[str]], np.ndarray]) -> TaskQuery:
    """Embed a task's texts with `encode` (unit vectors out) and average the examples.

    The means are deliberately not re-normalised: a dot product with the mean of unit vectors is the
    mean of the cosine similarities, which is what the score asks for."""
    inputs = [example.input for example in task.examples]
    outputs = [example.output for example in task.examples]
    vectors = np.asarray(encode([*inputs, *outputs, task.instruction]), dtype=np.float32)
    count = len(inputs)
    return TaskQuery(
        input=vectors[:count].mean(axis=0),
        output=vectors[count : 2 * count].mean(axis=0),
        instruction=vectors[-1],
    )


def cell_similarities(cell_vectors: np.ndarray, query: TaskQuery) -> np.ndarray:
    """(n, 2) array: each cell's mean similarity to the example inputs (column 0) and outputs (column 1)."""
    return cell_vectors @ np.stack([query.input, query.output], axis=1)


def row_maxima(row_codes: np.ndarray, similarities: np.ndarray, num_rows: int) -> np.ndarray:
    """(num_rows, k): for each row code 0..num_rows-1 the maximum of `similarities` over its cells.
    Rows without cells get -inf."""
    maxima = np.full((num_rows, similarities.shape[1]), -np.inf, dtype=np.float32)
    np.maximum.at(maxima, row_codes, similarities)
    return maxima


def rebase_scores(input_max: np.ndarray, output_max: np.ndarray, description: np.ndarray) -> np.ndarray:
    """The ReBase row score: the mean of the three partial scores."""
    return (input_max + output_max + description) / 3.0


def select_rows(
    scores: np.ndarray,
    dataset_ids: Sequence[str],
    duplicate_keys: Sequence[object],
    top_k: int,
    bans: Sequence[str] = (),
    per_dataset_cap: int | None = None,
) -> list[int]:
    """Indices of the rows to keep, best first: banned datasets never, an exact duplicate of a kept row
    never, at most `per_dataset_cap` rows from one dataset, at most `top_k` rows. Ties keep input order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    kept: list[int] = []
    seen: set[object] = set()
    per_dataset: dict[str, int] = {}
    banned: dict[str, bool] = {}
    for index in order:
        dataset_id = dataset_ids[index]
        if banned.setdefault(dataset_id, is_banned(dataset_id, list(bans))):
            continue
        if duplicate_keys[index] in seen:
            continue
        if per_dataset_cap is not None and per_dataset.get(dataset_id, 0) >= per_dataset_cap:
            continue
        kept.append(int(index))
        seen.add(duplicate_keys[index])
        per_dataset[dataset_id] = per_dataset.get(dataset_id, 0) + 1
        if len(kept) == top_k:
            break
    return kept
