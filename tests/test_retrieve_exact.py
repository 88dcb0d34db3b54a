"""Exact mode (rebase/retrieve/exact.py) over a hand-written store: rows cut by part boundaries, bans,
duplicates and the kept rows, with scores computed by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rebase.errors import RebaseError
from rebase.io import numpy_to_embeddings
from rebase.retrieve.exact import exact_candidates
from rebase.retrieve.score import TaskQuery

QUERY = TaskQuery(
    input=np.array([1, 0], np.float32), output=np.array([0, 1], np.float32), instruction=np.zeros(2, np.float32)
)
DESCRIPTIONS = {"d": 0.5, "x/banned": -np.inf, "e": 0.1}  # as apply_bans leaves them


def _cells(*cells: tuple[str, str, str, int]) -> pa.Table:
    uids, datasets, columns, values = zip(*cells) if cells else ((), (), (), ())
    return pa.table(
        {
            "row_uid": pa.array(uids, pa.string()),
            "dataset_id": pa.array(datasets, pa.string()),
            "column": pa.array(columns, pa.string()),
            "value_id": pa.array(values, pa.int64()),
        }
    )


@pytest.fixture
def store(tmp_path):
    values = {10: (1, 0), 20: (0, 1), 30: (0.6, 0.8), -5: (0.8, 0.6)}  # (input, output) similarity of each
    (tmp_path / "values" / "k").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "value_id": pa.array(list(values), pa.int64()),
                "embedding": numpy_to_embeddings(np.array(list(values.values()), np.float32)),
            }
        ),
        tmp_path / "values" / "k" / "block-00000.parquet",
    )
    parts = [
        _cells(("r0", "d", "a", 10), ("r1", "d", "a", 30)),  # r1 goes on in the next part
        _cells(("r1", "d", "b", 20), ("r2", "x/banned", "a", 10), ("r3", "e", "a", -5)),
        _cells(),  # an empty part
        _cells(("r4", "e", "a", 30), ("r4", "e", "b", 10), ("r5", "e", "b", 10), ("r5", "e", "a", 30)),  # r5 = r4
    ]
    (tmp_path / "cells" / "k").mkdir(parents=True)
    for number, part in enumerate(parts):
        pq.write_table(part, tmp_path / "cells" / "k" / f"part-{number:05d}.parquet")
    return tmp_path


def test_every_unbanned_row_is_scored_across_part_boundaries(store):
    found = exact_candidates(store, QUERY, DESCRIPTIONS, limit=10, dimension=2)
    assert found.row_uid.tolist() == ["r0", "r1", "r3", "r4", "r5"]  # r2's dataset is banned
    assert found.dataset_id.tolist() == ["d", "d", "e", "e", "e"]
    np.testing.assert_allclose(found.input, [1, 0.6, 0.8, 1, 1], atol=1e-6)  # r1: its cells in two parts
    np.testing.assert_allclose(found.output, [0, 1, 0.6, 0.8, 0.8], atol=1e-6)
    np.testing.assert_allclose(found.description, [0.5, 0.5, 0.1, 0.1, 0.1])
    expected = [(1 + 0.5) / 3, (0.6 + 1 + 0.5) / 3, (0.8 + 0.6 + 0.1) / 3, (1 + 0.8 + 0.1) / 3, (1 + 0.8 + 0.1) / 3]
    np.testing.assert_allclose(found.score, expected, atol=1e-6)
    assert found.key[3] == found.key[4] and len(set(found.key.tolist())) == 4  # r5 holds r4's cells


def test_only_the_best_rows_are_kept_while_streaming(store):
    found = exact_candidates(store, QUERY, DESCRIPTIONS, limit=1, dimension=2)
    # Whenever more than 2 x limit rows are held, the best `limit` are kept: r0 and r1 come first, r3 and r4
    # make four (r1 is kept), r5 comes after that cut.
    assert found.row_uid.tolist() == ["r1", "r5"]


def test_a_store_without_values_is_refused(tmp_path):
    with pytest.raises(RebaseError, match="no embedded values"):
        exact_candidates(tmp_path, QUERY, DESCRIPTIONS, limit=1, dimension=2)
