"""The ReBase score (Ge et al. 2024) as plain functions on numpy arrays, with bans and row selection.

For a task with instruction I and examples (x_j, y_j), a row r of dataset D scores
    score(r) = ( max_cells mean_j s(x_j, c) + max_cells mean_j s(y_j, c) + s(I, description(D)) ) / 3
With unit vectors, mean_j s(x_j, c) = (mean_j e(x_j)) . e(c): one dot product with the mean example
vector per cell, so a task needs two cell queries and one dataset query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from rebase.task import TaskSpec, is_banned


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


def group_maxima(starts: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """(rows, k): each row's maximum of `similarities` over its cells, for cells grouped by row, each
    row's cells from its entry of `starts` (increasing, every row with at least one cell) to the next."""
    if not len(starts):
        return np.zeros((0, similarities.shape[1]), np.float32)
    return np.maximum.reduceat(similarities, starts, axis=0).astype(np.float32, copy=False)


def rebase_scores(input_max: np.ndarray, output_max: np.ndarray, description: np.ndarray) -> np.ndarray:
    """The ReBase row score: the mean of the three partial scores."""
    return (input_max + output_max + description) / 3.0


def apply_bans(description_by_id: dict[str, float], bans: Sequence[str]) -> dict[str, float]:
    """Each dataset's description similarity, -inf for a banned one: the one place bans are applied, as
    both modes never take a row whose dataset scores -inf."""
    return {name: -np.inf if is_banned(name, bans) else score for name, score in description_by_id.items()}


@dataclass(frozen=True)
class Candidates:
    """Scored rows, one entry per row in every array: ids, the three partial scores, the ReBase score and a
    duplicate key (equal for rows with the same (column, value) pairs)."""

    row_uid: np.ndarray
    dataset_id: np.ndarray
    input: np.ndarray
    output: np.ndarray
    description: np.ndarray
    score: np.ndarray
    key: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def take(self, indices: np.ndarray) -> Candidates:
        """The rows at `indices` (positions or a mask), in that order."""
        return Candidates(**{field.name: getattr(self, field.name)[indices] for field in fields(self)})

    def best(self, limit: int) -> Candidates:
        """The best `limit` rows by score, in no particular order (all of them when there are no more)."""
        if len(self) <= limit:
            return self
        return self.take(np.argpartition(-self.score, limit)[:limit])

    @staticmethod
    def concat(parts: Sequence[Candidates]) -> Candidates:
        """The rows of every part, part after part."""
        return Candidates(
            **{field.name: np.concatenate([getattr(p, field.name) for p in parts]) for field in fields(Candidates)}
        )


def select_rows(
    scores: np.ndarray,
    dataset_ids: Sequence[str],
    duplicate_keys: Sequence[object],
    top_k: int,
    per_dataset_cap: int | None = None,
) -> list[int]:
    """Indices of the rows to keep, best first: an exact duplicate of a kept row never, at most
    `per_dataset_cap` rows from one dataset, at most `top_k` rows. Ties keep input order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if per_dataset_cap is None:  # duplicates alone: each key's first row, in array steps
        first = np.unique(np.asarray(duplicate_keys)[order], return_index=True)[1] if len(order) else order
        return order[np.sort(first)[:top_k]].tolist()
    kept: list[int] = []
    seen: set[object] = set()
    per_dataset: dict[str, int] = {}
    for index in order:
        dataset_id = dataset_ids[index]
        if duplicate_keys[index] in seen or per_dataset.get(dataset_id, 0) >= per_dataset_cap:
            continue
        kept.append(int(index))
        seen.add(duplicate_keys[index])
        per_dataset[dataset_id] = per_dataset.get(dataset_id, 0) + 1
        if len(kept) == top_k:
            break
    return kept


def best_rows(candidates: Candidates, top_k: int, per_dataset_cap: int | None = None) -> Candidates:
    """The top K candidates after duplicates and the cap, best first; equal scores by row_uid, so runs agree."""
    order = np.argsort(-candidates.score, kind="stable")
    scores = candidates.score[order]
    tied = np.r_[False, scores[1:] == scores[:-1]] | np.r_[scores[:-1] == scores[1:], False]
    if tied.any():  # equal scores (duplicate rows, shared cells): only those are ordered by row_uid
        where = np.flatnonzero(tied)
        group = np.cumsum(np.r_[True, scores[1:] != scores[:-1]])[where]
        order[where] = order[where][np.lexsort((candidates.row_uid[order[where]].astype(str), group))]
    ordered = candidates.take(order)
    chosen = select_rows(ordered.score, ordered.dataset_id, ordered.key, top_k, per_dataset_cap)
    return ordered.take(np.asarray(chosen, dtype=np.int64))


def score_bounds(
    starts: np.ndarray, cell_known: np.ndarray, ceiling: np.ndarray, description: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of each row's ReBase score before re-scoring it. `cell_known` holds the cells'
    similarities where the search found their value (-inf elsewhere); a value it did not find is at most
    as similar as the last one it returned (`ceiling`, per query; -inf where it returned every value).
    So a row's partial score is at least its best known cell and at most that or the ceiling."""
    lower = group_maxima(starts, cell_known)
    upper = np.maximum(lower, ceiling[None, :])
    return rebase_scores(lower[:, 0], lower[:, 1], description), rebase_scores(upper[:, 0], upper[:, 1], description)


def distinct_floor(scores: np.ndarray, keys: np.ndarray, k: int) -> float:
    """The k-th best score among rows with distinct keys (each key at its best row); -inf if fewer keys.
    With scores that are lower bounds, no row whose upper bound is below it can be in the top k."""
    take = min(len(scores), 2 * k)  # the best rows first: enough keys among them unless many duplicate
    while True:
        top = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else np.arange(len(scores))
        order = top[np.argsort(-scores[top], kind="stable")]
        firsts = np.sort(np.unique(keys[order], return_index=True)[1])
        if len(firsts) >= k:
            return float(scores[order[firsts[k - 1]]])
        if take == len(scores):
            return -np.inf
        take = min(len(scores), 4 * take)
