"""Cells grouped into rows, and the cell map: every cell of the datastore in memory as (row, value
number), so approximate mode can find the rows holding a value and the values of a row in array steps."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rebase.retrieve.score import Candidates

CELL_COLUMNS = ["row_uid", "dataset_id", "column", "value_id"]
_KEY_PRIME = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class RowGroups:
    """Cells grouped by row: the row_uid of every cell, where each row's cells start, and a key per row
    that is equal for rows with the same (column, value) pairs (to collapse exact duplicates)."""

    cell_uids: np.ndarray
    starts: np.ndarray
    keys: np.ndarray

    def row_of_cell(self) -> np.ndarray:
        """The row number (0, 1, ...) of every cell."""
        new_row = np.zeros(len(self.cell_uids), np.int64)
        new_row[self.starts] = 1
        return np.cumsum(new_row) - 1


def group_rows(table: pa.Table) -> RowGroups:
    """The rows of a cells table whose rows' cells are consecutive (as the datastore writes them).

    A row's key is the wrapping sum over its cells of mix(digest(column) * prime + value_id): the same set
    of (column, value) pairs gives the same key in every process (no per-process string hash), and the
    mix keeps a row with the same values in swapped columns from summing to the same key."""
    uids = table.column("row_uid").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]]) if len(uids) else np.zeros(0, np.int64)
    encoded = pc.dictionary_encode(table.column("column")).chunks  # a few column names, many cells
    cell_keys = np.concatenate(
        [_digests(chunk.dictionary.to_pylist())[chunk.indices.to_numpy()] for chunk in encoded]
        + [np.zeros(0, np.uint64)]
    )
    with np.errstate(over="ignore"):
        cell_keys = _mix(cell_keys * _KEY_PRIME + table.column("value_id").to_numpy().view(np.uint64))
        keys = np.add.reduceat(cell_keys, starts) if len(starts) else np.zeros(0, np.uint64)
    return RowGroups(uids, starts, keys)


def _mix(keys: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 keys (wrapping): a bijection that scatters nearby keys."""
    with np.errstate(over="ignore"):
        keys = (keys ^ (keys >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        keys = (keys ^ (keys >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return keys ^ (keys >> np.uint64(31))


def _digests(names: list[str]) -> np.ndarray:
    """A stable 64-bit digest of each column name."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") for name in names],
        dtype=np.uint64,
    )


def read_cells(datastore: Path) -> pa.Table:
    """Every cell of the datastore (row_uid, dataset_id, column, value_id), part after part."""
    paths = sorted((datastore / "cells").rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(path, columns=CELL_COLUMNS) for path in paths])


@dataclass
class CellMap:
    """Every cell as (row, value number), in memory: rows by value and values by row, for re-scoring.

    Values are numbered shard after shard in each shard's sorted id order (shard s holds numbers
    `shard_offsets[s]` to `shard_offsets[s + 1] - 1`), so a shard is asked for its values by position;
    a cell whose value no shard holds has number -1."""

    row_uids: np.ndarray
    row_datasets: np.ndarray
    row_dataset_codes: np.ndarray
    dataset_names: list[str]
    row_keys: np.ndarray
    row_offsets: np.ndarray
    cell_values: np.ndarray
    sorted_values: np.ndarray
    sorted_rows: np.ndarray
    dataset_rows: np.ndarray  # row numbers grouped by dataset code
    dataset_offsets: np.ndarray  # dataset code c holds dataset_rows[dataset_offsets[c]:dataset_offsets[c + 1]]
    shard_offsets: np.ndarray

    @classmethod
    def load(cls, datastore: Path, shard_ids: Callable[[], Sequence[np.ndarray]]) -> CellMap:
        """The datastore's cells, their values numbered by the shards' sorted ids (`ShardSearcher.value_ids`),
        which `shard_ids` returns: it is called once the cells are read, so the shards can load meanwhile."""
        table = read_cells(datastore)
        rows = group_rows(table)
        shard_ids = shard_ids()
        shard_offsets = np.r_[0, np.cumsum([len(ids) for ids in shard_ids])].astype(np.int64)
        all_ids = np.concatenate([*shard_ids, np.zeros(0, np.int64)]).astype(np.int64)
        id_order = np.argsort(all_ids, kind="stable")
        found = positions(all_ids[id_order], table.column("value_id").to_numpy())
        values = np.full(len(found), -1, np.int64)
        values[found >= 0] = id_order[found[found >= 0]]
        order = np.argsort(values, kind="stable")
        row_datasets = table.column("dataset_id").to_numpy()[rows.starts]
        dataset_names, dataset_codes = np.unique(row_datasets, return_inverse=True)
        return cls(
            row_uids=rows.cell_uids[rows.starts],
            row_datasets=row_datasets,
            row_dataset_codes=dataset_codes,
            dataset_names=dataset_names.tolist(),
            row_keys=rows.keys,
            row_offsets=np.r_[rows.starts, len(values)],
            cell_values=values,
            sorted_values=values[order],
            sorted_rows=rows.row_of_cell()[order],
            dataset_rows=np.argsort(dataset_codes, kind="stable"),
            dataset_offsets=np.r_[0, np.cumsum(np.bincount(dataset_codes, minlength=len(dataset_names)))],
            shard_offsets=shard_offsets,
        )

    def dataset_scores(self, description_by_id: dict[str, float]) -> np.ndarray:
        """The description score of each dataset code (-inf for a banned dataset: see `apply_bans`)."""
        return np.array([description_by_id[name] for name in self.dataset_names], dtype=np.float32)

    def candidate_rows(
        self, values: np.ndarray, dataset_priority: np.ndarray, per_value: int, dataset_rows: int
    ) -> np.ndarray:
        """The rows to re-score, sorted: the rows holding any of `values` (see `rows_holding`) and
        `dataset_rows` rows of the datasets of highest priority (see `rows_of_best_datasets`)."""
        rows = self.rows_holding(values, per_value, dataset_priority)
        if dataset_rows:
            rows = sorted_unique(np.concatenate([rows, self.rows_of_best_datasets(dataset_priority, dataset_rows)]))
        return rows

    def rows_of_best_datasets(self, dataset_priority: np.ndarray, budget: int) -> np.ndarray:
        """Rows of the datasets of highest priority (never -inf), whole datasets in priority order while
        the rows taken stay within `budget` (the first dataset's first `budget` rows if it alone is more)."""
        codes = np.argsort(-dataset_priority, kind="stable")
        codes = codes[np.isfinite(dataset_priority[codes])]
        sizes = np.diff(self.dataset_offsets)[codes]
        taken = codes[np.cumsum(sizes) <= budget]
        if not len(taken) and len(codes):
            start = self.dataset_offsets[codes[0]]
            return self.dataset_rows[start : start + budget]
        return self.dataset_rows[_ranges(self.dataset_offsets[taken], sizes[: len(taken)])]

    def rows_holding(self, values: np.ndarray, per_value: int, dataset_priority: np.ndarray) -> np.ndarray:
        """Rows with any of the values (numbers). A value held by more than `per_value` rows (a label such as
        "Yes" repeats millions of times) contributes its `per_value` rows whose dataset has the highest
        priority; rows of a dataset whose priority is -inf (banned) are never taken."""
        lo = np.searchsorted(self.sorted_values, values, side="left")
        hi = np.searchsorted(self.sorted_values, values, side="right")
        counts = hi - lo
        light = counts <= per_value  # most values: every row holding them, gathered in one step
        spans = [self.sorted_rows[_ranges(lo[light], counts[light])]]
        for a, b in zip(lo[~light], hi[~light]):  # the few shared values: their best rows
            rows = self.sorted_rows[a:b]
            priority = dataset_priority[self.row_dataset_codes[rows]]
            spans.append(rows[np.argpartition(-priority, per_value - 1)[:per_value]])
        rows = sorted_unique(np.concatenate(spans))
        return rows[np.isfinite(dataset_priority[self.row_dataset_codes[rows]])]

    def cells_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each row's cells start, and the value numbers of every cell of the rows, row after row."""
        counts = self.row_offsets[rows + 1] - self.row_offsets[rows]
        return np.cumsum(counts) - counts, self.cell_values[_ranges(self.row_offsets[rows], counts)]

    def candidates(
        self, rows: np.ndarray, maxima: np.ndarray, description: np.ndarray, scores: np.ndarray
    ) -> Candidates:
        """The scored `rows` (numbers) with their ids and duplicate keys."""
        return Candidates(
            row_uid=self.row_uids[rows],
            dataset_id=self.row_datasets[rows],
            input=maxima[:, 0],
            output=maxima[:, 1],
            description=description,
            score=scores,
            key=self.row_keys[rows],
        )


def positions(sorted_ids: np.ndarray, value_ids: np.ndarray) -> np.ndarray:
    """Where each of `value_ids` stands in `sorted_ids` (same shape as `value_ids`), -1 where it is absent.
    The keys are searched in sorted order, so searchsorted walks `sorted_ids` in one direction (0.6 instead
    of 2.6 ms for 8,000 random ids among 750,000)."""
    keys = np.ravel(value_ids)
    if not len(sorted_ids):
        return np.full(np.shape(value_ids), -1, np.int64)
    order = np.argsort(keys)
    found = np.empty(len(keys), np.int64)
    found[order] = np.minimum(np.searchsorted(sorted_ids, keys[order]), len(sorted_ids) - 1)
    return np.where(sorted_ids[found] == keys, found, -1).reshape(np.shape(value_ids))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)` by sorting: numpy 2's hash-based unique is several times slower on these
    integer arrays (2.7 against 0.2 ms for 30,000 row numbers)."""
    ordered = np.sort(values)
    return ordered[_firsts(ordered)]


def sorted_unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(values, return_inverse=True)` by sorting (see `sorted_unique`)."""
    order = np.argsort(values)
    ordered = values[order]
    first = _firsts(ordered)
    where = np.empty(len(values), np.int64)
    where[order] = np.cumsum(first) - 1
    return ordered[first], where


def _firsts(ordered: np.ndarray) -> np.ndarray:
    """Where each run of equal values of a sorted array starts."""
    return np.r_[True, ordered[1:] != ordered[:-1]] if len(ordered) else np.zeros(0, bool)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The positions start, start+1, ..., start+count-1 of every (start, count), concatenated."""
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + within
