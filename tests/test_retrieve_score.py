"""The ReBase score, bans and row selection (rebase/retrieve/score.py) on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from rebase.retrieve.score import (
    Candidates,
    TaskQuery,
    apply_bans,
    best_rows,
    cell_similarities,
    distinct_floor,
    group_maxima,
    rebase_scores,
    score_bounds,
    select_rows,
    task_query,
)
from rebase.task import Example, TaskSpec, is_banned


def unit(*values):
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def candidates(scores, datasets, keys, uids=None) -> Candidates:
    count = len(scores)
    return Candidates(
        row_uid=np.array(uids or [f"r{i}" for i in range(count)], dtype=object),
        dataset_id=np.array(datasets, dtype=object),
        input=np.zeros(count, np.float32),
        output=np.zeros(count, np.float32),
        description=np.zeros(count, np.float32),
        score=np.array(scores, np.float32),
        key=np.array(keys, np.uint64),
    )


def test_task_query_averages_example_vectors_without_renormalising():
    task = TaskSpec(
        name="t",
        instruction="do it",
        examples=[Example(input="a", output="c"), Example(input="b", output="c")],
    )
    table = {"a": unit(1, 0, 0), "b": unit(0, 1, 0), "c": unit(0, 0, 1), "do it": unit(1, 1, 0)}
    query = task_query(task, lambda texts: np.stack([table[t] for t in texts]))
    np.testing.assert_allclose(query.input, [0.5, 0.5, 0])  # norm 0.707: a mean of cosines, not a cosine
    np.testing.assert_allclose(query.output, [0, 0, 1])
    np.testing.assert_allclose(query.instruction, unit(1, 1, 0))


def test_score_of_a_hand_computed_case():
    # Examples: inputs x1=(1,0,0), x2=(0,1,0); outputs y1=y2=(0,0,1); instruction I=(1,1,0)/sqrt2.
    query = TaskQuery(
        input=np.array([0.5, 0.5, 0], np.float32), output=np.array([0, 0, 1], np.float32), instruction=unit(1, 1, 0)
    )
    # Row 0: cells c0=(1,0,0), c1=(0,0.6,0.8). Row 1: cell c2=(0.6,0.8,0).
    cells = np.stack([unit(1, 0, 0), unit(0, 0.6, 0.8), unit(0.6, 0.8, 0)])
    sims = cell_similarities(cells, query)
    # input sim = mean_j cos(x_j, c): c0 -> (1+0)/2 = 0.5; c1 -> (0+0.6)/2 = 0.3; c2 -> (0.6+0.8)/2 = 0.7
    # output sim = cos(y, c): c0 -> 0; c1 -> 0.8; c2 -> 0
    np.testing.assert_allclose(sims, [[0.5, 0.0], [0.3, 0.8], [0.7, 0.0]], atol=1e-6)
    maxima = group_maxima(np.array([0, 2]), sims)
    np.testing.assert_allclose(maxima, [[0.5, 0.8], [0.7, 0.0]], atol=1e-6)
    # Descriptions: D0 = (1,0,0) -> cos(I, D0) = 1/sqrt2; D1 = (0,0,1) -> 0.
    description = np.array([1 / np.sqrt(2), 0.0], np.float32)
    scores = rebase_scores(maxima[:, 0], maxima[:, 1], description)
    np.testing.assert_allclose(scores, [(0.5 + 0.8 + 0.70710678) / 3, 0.7 / 3], atol=1e-6)


def test_group_maxima_takes_each_rows_maximum_per_column():
    sims = np.array([[0.2, 0.1], [0.4, -0.3], [-0.5, 0.9], [0.0, 0.0], [0.3, -0.1]], np.float32)
    np.testing.assert_allclose(group_maxima(np.array([0, 2, 3]), sims), [[0.4, 0.1], [-0.5, 0.9], [0.3, 0.0]])
    assert group_maxima(np.zeros(0, np.int64), np.zeros((0, 2), np.float32)).shape == (0, 2)


@pytest.mark.parametrize(
    ("dataset_id", "banned"),
    [
        ("bigbench/navigate", True),
        ("bigbench/navigate/subtask", True),
        ("bigbench/navigate_more", False),  # a substring test would wrongly ban this
        ("bigbench/xnavigate", False),
        ("hf/glue", True),
        ("hf/glue-x", False),
        ("files/navigate", False),
    ],
)
def test_bans_match_whole_id_segments(dataset_id, banned):
    assert is_banned(dataset_id, ["bigbench/navigate", "hf/glue"]) is banned
    scores = apply_bans({dataset_id: 0.25, "other/x": 0.5}, ["bigbench/navigate", "hf/glue"])
    assert scores == {dataset_id: -np.inf if banned else 0.25, "other/x": 0.5}


def test_select_rows_applies_duplicates_and_the_per_dataset_cap():
    scores = np.array([0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.75])
    datasets = ["a", "a", "b", "a", "d", "c", "b"]
    duplicates = ["r0", "r1", "r0", "r3", "r4", "r5", "r6"]  # row 2 is an exact copy of row 0
    assert select_rows(scores, datasets, duplicates, top_k=10) == [4, 0, 1, 6, 3, 5]
    assert select_rows(scores, datasets, duplicates, top_k=10, per_dataset_cap=1) == [4, 0, 6, 5]
    assert select_rows(scores, datasets, duplicates, top_k=3) == [4, 0, 1]
    assert select_rows(scores, datasets, duplicates, top_k=3, per_dataset_cap=2) == [4, 0, 1]
    assert select_rows(np.zeros(0), [], [], top_k=3) == []


def test_best_rows_orders_equal_scores_by_row_uid_and_keeps_every_field():
    rows = candidates([0.5, 0.9, 0.5, 0.7, 0.9], ["a", "a", "b", "b", "c"], [1, 2, 3, 4, 2], ["z", "y", "x", "w", "v"])
    best = best_rows(rows, top_k=3)
    # 0.9 twice (keys equal: one kept, the smaller row_uid "v"), then 0.7, then 0.5 twice: "x" before "z"
    assert best.row_uid.tolist() == ["v", "w", "x"]
    assert best.dataset_id.tolist() == ["c", "b", "b"] and best.key.tolist() == [2, 4, 3]
    np.testing.assert_allclose(best.score, [0.9, 0.7, 0.5])
    assert best_rows(rows, top_k=5, per_dataset_cap=1).row_uid.tolist() == ["v", "w", "z"]


def test_candidates_take_best_and_concat():
    rows = candidates([0.1, 0.4, 0.3, 0.2], ["a", "b", "c", "d"], [0, 1, 2, 3])
    assert rows.take(np.array([2, 0])).row_uid.tolist() == ["r2", "r0"]
    assert sorted(rows.best(2).row_uid.tolist()) == ["r1", "r2"] and rows.best(4) is rows
    both = Candidates.concat([rows.take(np.array([3])), rows.take(np.array([1]))])
    assert both.dataset_id.tolist() == ["d", "b"] and both.key.tolist() == [3, 1] and len(both) == 2


def test_score_bounds_of_a_hand_computed_case():
    # Row 0: cells a (found by both queries: 0.9, 0.2) and b (not found). Row 1: cell c (found by the
    # output query only: 0.7; its input similarity is not known). The last scores found: 0.5 and 0.6.
    known = np.array([[0.9, 0.2], [-np.inf, -np.inf], [-np.inf, 0.7]], np.float32)
    ceiling = np.array([0.5, 0.6], np.float32)
    low, high = score_bounds(np.array([0, 2]), known, ceiling, np.array([0.3, 0.0], np.float32))
    np.testing.assert_allclose(low, [(0.9 + 0.2 + 0.3) / 3, -np.inf])
    np.testing.assert_allclose(high, [(0.9 + 0.6 + 0.3) / 3, (0.5 + 0.7 + 0.0) / 3])


def test_distinct_floor_counts_each_key_once():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
    keys = np.array([1, 1, 2, 3, 3, 4], np.uint64)  # best per key: 0.9, 0.8, 0.7, 0.5
    assert distinct_floor(scores, keys, 2) == 0.8
    assert distinct_floor(scores, keys, 3) == 0.7
    assert distinct_floor(scores, keys, 4) == 0.5
    assert distinct_floor(scores, keys, 5) == -np.inf
    many = np.arange(100, dtype=np.float64)  # more duplicates than the first look (2k rows) holds
    assert distinct_floor(many, np.repeat(np.arange(10, dtype=np.uint64), 10), 3) == 79
