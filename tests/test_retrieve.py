"""The ReBase score and row selection on hand-computed cases (pure functions, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from rebase.retrieve import (
    CellMap,
    ShardSearcher,
    TaskQuery,
    cell_similarities,
    distinct_floor,
    group_maxima,
    rebase_scores,
    row_maxima,
    score_bounds,
    select_rows,
    sorted_unique,
    task_query,
)
from rebase.task import Example, TaskSpec, is_banned


def unit(*values):
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


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
    maxima = row_maxima(np.array([0, 0, 1]), sims, 2)
    np.testing.assert_allclose(maxima, [[0.5, 0.8], [0.7, 0.0]], atol=1e-6)
    # Descriptions: D0 = (1,0,0) -> cos(I, D0) = 1/sqrt2; D1 = (0,0,1) -> 0.
    description = np.array([1 / np.sqrt(2), 0.0], np.float32)
    scores = rebase_scores(maxima[:, 0], maxima[:, 1], description)
    np.testing.assert_allclose(scores, [(0.5 + 0.8 + 0.70710678) / 3, 0.7 / 3], atol=1e-6)


def test_row_without_cells_scores_minus_infinity():
    maxima = row_maxima(np.array([1, 1]), np.array([[0.2, 0.1], [0.4, -0.3]], np.float32), 3)
    assert np.isneginf(maxima[0]).all() and np.isneginf(maxima[2]).all()
    np.testing.assert_allclose(maxima[1], [0.4, 0.1])


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


def test_select_rows_applies_bans_duplicates_and_the_per_dataset_cap():
    scores = np.array([0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.75])
    datasets = ["a", "a", "b", "a", "banned/x", "c", "b"]
    duplicates = ["r0", "r1", "r0", "r3", "r4", "r5", "r6"]  # row 2 is an exact copy of row 0
    assert select_rows(scores, datasets, duplicates, top_k=10, bans=["banned"]) == [0, 1, 6, 3, 5]
    assert select_rows(scores, datasets, duplicates, top_k=10, bans=["banned"], per_dataset_cap=1) == [0, 6, 5]
    assert select_rows(scores, datasets, duplicates, top_k=2, bans=["banned"]) == [0, 1]
    assert select_rows(scores, datasets, duplicates, top_k=3) == [4, 0, 1]


def test_group_maxima_equals_row_maxima_for_grouped_cells():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 5, 50)
    codes = np.repeat(np.arange(50), counts)
    sims = rng.normal(size=(len(codes), 2)).astype(np.float32)
    starts = np.cumsum(counts) - counts
    np.testing.assert_array_equal(group_maxima(starts, sims), row_maxima(codes, sims, 50))
    assert group_maxima(np.zeros(0, np.int64), np.zeros((0, 2), np.float32)).shape == (0, 2)


def _cell_map(dataset_of_row: list[str]) -> CellMap:
    """A cell map of one cell per row, only the fields the dataset lookups use."""
    names, codes = np.unique(np.array(dataset_of_row), return_inverse=True)
    return CellMap(
        row_uids=np.array([f"r{i}" for i in range(len(codes))], dtype=object),
        row_datasets=np.array(dataset_of_row, dtype=object),
        row_dataset_codes=codes,
        dataset_names=names.tolist(),
        row_keys=np.arange(len(codes), dtype=np.uint64),
        row_offsets=np.arange(len(codes) + 1),
        cell_values=np.arange(len(codes)),
        sorted_values=np.arange(len(codes)),
        sorted_rows=np.arange(len(codes)),
        dataset_rows=np.argsort(codes, kind="stable"),
        dataset_offsets=np.r_[0, np.cumsum(np.bincount(codes, minlength=len(names)))],
        shard_offsets=np.array([0, len(codes)]),
    )


def test_rows_of_best_datasets_takes_whole_datasets_best_first_within_the_budget():
    cells = _cell_map(["a", "b", "a", "c", "b", "a", "d"])  # a: rows 0,2,5; b: 1,4; c: 3; d: 6
    priority = np.array([0.1, 0.9, 0.5, -np.inf], np.float32)  # a, b, c, d (d banned)
    assert sorted(cells.rows_of_best_datasets(priority, 3)) == [1, 3, 4]  # b (2 rows), c (1 row)
    assert sorted(cells.rows_of_best_datasets(priority, 5)) == [1, 3, 4]  # a's 3 rows would pass 5
    assert sorted(cells.rows_of_best_datasets(priority, 6)) == [0, 1, 2, 3, 4, 5]  # never banned d
    assert list(cells.rows_of_best_datasets(priority, 1)) == [1]  # the best dataset alone is too big
    assert len(cells.rows_of_best_datasets(np.full(4, -np.inf, np.float32), 10)) == 0


def test_positions_in_sorted_ids_keep_shape_and_mark_absent_ids():
    from rebase.retrieve import _positions

    sorted_ids = np.array([-9, -1, 4, 10, 77])
    got = _positions(sorted_ids, np.array([[10, 5, -9], [77, 100, -20]]))
    np.testing.assert_array_equal(got, [[3, -1, 0], [4, -1, -1]])
    np.testing.assert_array_equal(_positions(np.zeros(0, np.int64), np.array([1, 2])), [-1, -1])


def test_sorted_unique_matches_numpy_unique():
    rng = np.random.default_rng(3)
    for values in (rng.integers(-5, 50, 300), np.zeros(0, np.int64), np.array([7])):
        np.testing.assert_array_equal(sorted_unique(values), np.unique(values))
        unique, inverse = sorted_unique(values, inverse=True)
        np.testing.assert_array_equal(unique, np.unique(values))
        np.testing.assert_array_equal(unique[inverse], values)


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


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_shard_searcher_reads_vectors_in_place_and_matches_reconstruct(tmp_path, kind):
    """The searcher gathers vectors from FAISS's own memory; it must equal FAISS's reconstruct path."""
    import faiss

    from rebase.datastore.index import make_index

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.integers(-(2**62), 2**62, size=3000)
    path = tmp_path / f"{kind}.faiss"
    faiss.write_index(make_index(kind, vectors, ids), str(path))
    searcher = ShardSearcher(str(path), threads=2)
    assert searcher.rows is not None  # the in-place path, not the fallback
    queries = vectors[:2] + 0.1
    positions = rng.permutation(3000)[:1500]
    expected = vectors[np.argsort(ids)][positions] @ queries.T  # positions are in sorted id order
    np.testing.assert_allclose(searcher.similarities(positions, queries), expected, atol=1e-5)
    searcher.rows = None  # FAISS's reconstruct path gives the same
    np.testing.assert_allclose(searcher.similarities(positions, queries), expected, atol=1e-5)
    found, scores, cross = searcher.search(queries, 5, every_query=True)
    assert (searcher.value_ids()[found[0, 0]], searcher.value_ids()[found[1, 0]]) == (ids[0], ids[1])
    np.testing.assert_allclose(cross[[0, 1], :, [0, 1]], scores, atol=1e-5)  # own query: the search's score
    np.testing.assert_allclose(cross[0, 0], vectors[0] @ queries.T, atol=1e-5)
