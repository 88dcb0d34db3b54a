"""Exact mode: every row of the datastore scored, streaming over the values blocks and the cells parts,
so memory stays at one part and the best rows found so far."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rebase.errors import RebaseError
from rebase.io import embeddings_to_numpy, iter_parquet
from rebase.retrieve.cells import CELL_COLUMNS, group_rows
from rebase.retrieve.score import Candidates, TaskQuery, cell_similarities, group_maxima, rebase_scores


def exact_candidates(
    datastore: Path, query: TaskQuery, description_by_id: dict[str, float], limit: int, dimension: int
) -> Candidates:
    """Every row scored, streaming; rows of a dataset scored -inf (banned, see `apply_bans`) are dropped,
    and whenever more than 2 x `limit` rows are held only the best `limit` stay, so the best `limit` rows
    are always among those returned."""
    value_ids, value_sims = _value_similarities(datastore, query, dimension)
    kept: Candidates | None = None
    for table in _row_tables(datastore):
        block = _scored(table, value_ids, value_sims, description_by_id)
        kept = block if kept is None else Candidates.concat([kept, block])
        if len(kept) > 2 * limit:
            kept = kept.best(limit)
    if kept is None:
        raise RebaseError(f"{datastore} holds no cells; build it first")
    return kept


def _value_similarities(datastore: Path, query: TaskQuery, dimension: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted value ids and their (input, output) similarities, streamed over the values blocks."""
    ids, sims = [], []
    for path in sorted((datastore / "values").rglob("block-*.parquet")):
        for batch in iter_parquet([path], columns=["value_id", "embedding"]):
            ids.append(batch.column("value_id").to_numpy())
            sims.append(cell_similarities(embeddings_to_numpy(batch.column("embedding"), dimension), query))
    if not ids:
        raise RebaseError(f"{datastore} holds no embedded values; build it first")
    ids_array = np.concatenate(ids)
    order = np.argsort(ids_array, kind="stable")
    return ids_array[order], np.concatenate(sims)[order]


def _row_tables(datastore: Path) -> Iterator[pa.Table]:
    """The cells of whole rows, a part at a time: a row's cells are consecutive, and the cells of each
    part's last row are held back and read with the next part, as the row may go on there."""
    held: pa.Table | None = None
    for path in sorted((datastore / "cells").rglob("*.parquet")):
        table = pq.read_table(path, columns=CELL_COLUMNS)
        if held is not None:
            table = pa.concat_tables([held, table])
        if table.num_rows == 0:
            continue
        uids = table.column("row_uid")
        last = pc.index(uids, uids[table.num_rows - 1]).as_py()  # where the last row's cells start
        held = table.slice(last)
        if last:
            yield table.slice(0, last)
    if held is not None:
        yield held


def _scored(
    table: pa.Table, value_ids: np.ndarray, value_sims: np.ndarray, description_by_id: dict[str, float]
) -> Candidates:
    """The rows of a cells table scored, those of datasets whose description score is -inf dropped."""
    rows = group_rows(table)
    found = np.searchsorted(value_ids, table.column("value_id").to_numpy())
    maxima = group_maxima(rows.starts, value_sims[np.minimum(found, len(value_ids) - 1)])
    dataset_ids = table.column("dataset_id").to_numpy(zero_copy_only=False)[rows.starts]
    names, codes = np.unique(dataset_ids, return_inverse=True)  # a few datasets, many rows
    description = np.array([description_by_id[name] for name in names], dtype=np.float32)[codes]
    keep = np.isfinite(description)
    return Candidates(
        row_uid=rows.cell_uids[rows.starts][keep],
        dataset_id=dataset_ids[keep],
        input=maxima[keep, 0],
        output=maxima[keep, 1],
        description=description[keep],
        score=rebase_scores(maxima[keep, 0], maxima[keep, 1], description[keep]),
        key=rows.keys[keep],
    )
