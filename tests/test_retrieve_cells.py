"""Cells grouped into rows and the cell map (rebase/retrieve/cells.py), on small hand-built arrays."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa

from rebase.retrieve.cells import CellMap, group_rows, positions, sorted_unique, sorted_unique_inverse

CELLS = pa.table(
    {
        "row_uid": ["r0", "r0", "r1", "r1", "r2", "r2", "r3"],
        "dataset_id": ["d"] * 7,
        "column": ["q", "a", "a", "q", "a", "q", "q"],
        "value_id": pa.array([5, -7, -7, 5, 5, -7, 5], pa.int64()),
    }
)


def test_group_rows_finds_rows_and_keys_equal_exactly_for_equal_cells():
    rows = group_rows(CELLS)
    assert rows.starts.tolist() == [0, 2, 4, 6]
    assert rows.row_of_cell().tolist() == [0, 0, 1, 1, 2, 2, 3]
    # r1 holds r0's (column, value) pairs in another order; r2 holds the same values in swapped columns
    assert rows.keys[0] == rows.keys[1] and len(set(rows.keys.tolist())) == 3
    key = (int.from_bytes(hashlib.blake2b(b"q", digest_size=8).digest(), "little") * 0x9E3779B97F4A7C15 + 5) % 2**64
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # SplitMix64's finaliser
        key = ((key ^ (key >> shift)) * factor) % 2**64
    assert int(rows.keys[3]) == key ^ (key >> 31)  # r3: one cell (q, 5)


def test_row_keys_do_not_depend_on_the_process():
    """Keys are stable digests, not Python's per-process string hash (PYTHONHASHSEED)."""
    script = (
        "import pyarrow as pa; from rebase.retrieve.cells import group_rows; "
        "t = pa.table({'row_uid': ['a', 'a', 'b'], 'column': ['x', 'y', 'x'], 'value_id': pa.array([1, 2, 3])}); "
        "print(group_rows(t).keys.tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    table = pa.table({"row_uid": ["a", "a", "b"], "column": ["x", "y", "x"], "value_id": pa.array([1, 2, 3])})
    assert other.stdout.strip() == str(group_rows(table).keys.tolist())


def _cell_map(dataset_of_row: list[str], values_of_row: list[list[int]] | None = None) -> CellMap:
    """A cell map with the given rows' datasets and value numbers (default: value i in row i alone)."""
    values_of_row = values_of_row or [[i] for i in range(len(dataset_of_row))]
    names, codes = np.unique(np.array(dataset_of_row), return_inverse=True)
    counts = np.array([len(v) for v in values_of_row])
    values = np.array([v for row in values_of_row for v in row], np.int64)
    order = np.argsort(values, kind="stable")
    return CellMap(
        row_uids=np.array([f"r{i}" for i in range(len(codes))], dtype=object),
        row_datasets=np.array(dataset_of_row, dtype=object),
        row_dataset_codes=codes,
        dataset_names=names.tolist(),
        row_keys=np.arange(len(codes), dtype=np.uint64),
        row_offsets=np.r_[0, np.cumsum(counts)],
        cell_values=values,
        sorted_values=values[order],
        sorted_rows=np.repeat(np.arange(len(codes)), counts)[order],
        dataset_rows=np.argsort(codes, kind="stable"),
        dataset_offsets=np.r_[0, np.cumsum(np.bincount(codes, minlength=len(names)))],
        shard_offsets=np.array([0, values.max() + 1]),
    )


def test_rows_of_best_datasets_takes_whole_datasets_best_first_within_the_budget():
    cells = _cell_map(["a", "b", "a", "c", "b", "a", "d"])  # a: rows 0,2,5; b: 1,4; c: 3; d: 6
    priority = np.array([0.1, 0.9, 0.5, -np.inf], np.float32)  # a, b, c, d (d banned)
    assert sorted(cells.rows_of_best_datasets(priority, 3)) == [1, 3, 4]  # b (2 rows), c (1 row)
    assert sorted(cells.rows_of_best_datasets(priority, 5)) == [1, 3, 4]  # a's 3 rows would pass 5
    assert sorted(cells.rows_of_best_datasets(priority, 6)) == [0, 1, 2, 3, 4, 5]  # never banned d
    assert list(cells.rows_of_best_datasets(priority, 1)) == [1]  # the best dataset alone is too big
    assert len(cells.rows_of_best_datasets(np.full(4, -np.inf, np.float32), 10)) == 0


def test_rows_holding_caps_shared_values_by_dataset_priority_and_skips_banned_rows():
    # value 9 is a label held by rows 0, 1, 2, 3; value 4 by row 1 only; value 6 by row 3 (banned dataset)
    cells = _cell_map(["a", "b", "c", "d"], [[9, 0], [4, 9], [9, 1], [9, 6]])
    priority = np.array([0.2, 0.1, 0.7, -np.inf], np.float32)  # a, b, c, d (d banned)
    assert cells.rows_holding(np.array([9]), 2, priority).tolist() == [0, 2]  # its two best datasets
    assert cells.rows_holding(np.array([4, 6, 9]), 4, priority).tolist() == [0, 1, 2]
    assert cells.candidate_rows(np.array([4]), priority, 2, dataset_rows=1).tolist() == [1, 2]  # + c's row
    starts, values = cells.cells_of(np.array([3, 1]))
    assert starts.tolist() == [0, 2] and values.tolist() == [9, 6, 4, 9]


def test_dataset_scores_and_candidates_follow_the_dataset_codes():
    cells = _cell_map(["b", "a", "b"])
    np.testing.assert_allclose(cells.dataset_scores({"a": 0.5, "b": -np.inf}), [0.5, -np.inf])
    found = cells.candidates(
        np.array([2, 1]), np.array([[0.1, 0.2], [0.3, 0.4]], np.float32), np.zeros(2), np.array([0.7, 0.6])
    )
    assert found.row_uid.tolist() == ["r2", "r1"] and found.dataset_id.tolist() == ["b", "a"]
    assert found.input.tolist() == [np.float32(0.1), np.float32(0.3)] and found.key.tolist() == [2, 1]


def test_positions_in_sorted_ids_keep_shape_and_mark_absent_ids():
    sorted_ids = np.array([-9, -1, 4, 10, 77])
    got = positions(sorted_ids, np.array([[10, 5, -9], [77, 100, -20]]))
    np.testing.assert_array_equal(got, [[3, -1, 0], [4, -1, -1]])
    np.testing.assert_array_equal(positions(np.zeros(0, np.int64), np.array([1, 2])), [-1, -1])


def test_sorted_unique_matches_numpy_unique():
    rng = np.random.default_rng(3)
    for values in (rng.integers(-5, 50, 300), np.zeros(0, np.int64), np.array([7])):
        np.testing.assert_array_equal(sorted_unique(values), np.unique(values))
        unique, inverse = sorted_unique_inverse(values)
        np.testing.assert_array_equal(unique, np.unique(values))
        np.testing.assert_array_equal(unique[inverse], values)
