"""The ReBase score (Ge et al. 2024) as plain functions on numpy arrays, with bans and row selection.

For a task with instruction I and examples (x_j, y_j), a row r of dataset D scores
    score(r) = ( max_cells mean_j s(x_j, c) + max_cells mean_j s(y_j, c) + s(I, description(D)) ) / 3
With unit vectors, mean_j s(x_j, c) = (mean_j e(x_j)) . e(c): one dot product with the mean example
vector per cell, so a task needs two cell queries and one dataset query.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rebase.datastore.manifest import read_manifest
from rebase.errors import RebaseError
from rebase.io import embeddings_to_numpy, iter_parquet, write_json_atomic, write_parquet_atomic
from rebase.models import canonical_model_name, resolve_model
from rebase.task import TaskSpec, is_banned

__all__ = [
    "TaskQuery",
    "cell_similarities",
    "is_banned",
    "rebase_scores",
    "retrieve",
    "row_maxima",
    "select_rows",
    "task_query",
]


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


# ---------------------------------------------------------------- exact retrieval over a datastore

ROW_CODE_PRIME = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class RetrieveSummary:
    out: Path
    top_k: int
    rows: int
    datasets: int
    top_datasets: list[tuple[str, int]]
    score_range: tuple[float, float]
    seconds: float
    mode: str

    def line(self) -> str:
        top = ", ".join(f"{d} ({n})" for d, n in self.top_datasets[:5])
        low, high = self.score_range
        return (
            f"retrieved {self.rows:,} of top-{self.top_k:,} rows ({self.mode}) from {self.datasets} datasets into "
            f"{self.out}; top datasets: {top}; scores {low:.3f} to {high:.3f}; {self.seconds:.1f} s"
        )


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


def _row_blocks(datastore: Path, value_ids: np.ndarray, value_sims: np.ndarray):
    """Per-row (row_uid, dataset_id, input max, output max, duplicate key) in blocks, streamed over the cells.

    A row's cells are consecutive; a row cut by a part boundary is held back and merged with the next part."""
    carry = None
    for path in sorted((datastore / "cells").rglob("*.parquet")):
        table = pq.read_table(path, columns=["row_uid", "dataset_id", "column", "value_id"])
        if table.num_rows == 0:
            continue
        uids = table.column("row_uid").to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]])
        codes = np.cumsum(np.r_[True, uids[1:] != uids[:-1]]) - 1
        positions = np.searchsorted(value_ids, table.column("value_id").to_numpy())
        sims = value_sims[np.minimum(positions, len(value_ids) - 1)]
        maxima = row_maxima(codes, sims, len(starts))
        columns = table.column("column").to_pylist()
        cell_keys = np.array([hash(c) & 0xFFFFFFFFFFFFFFFF for c in columns], dtype=np.uint64)
        with np.errstate(over="ignore"):
            cell_keys = cell_keys * ROW_CODE_PRIME + table.column("value_id").to_numpy().view(np.uint64)
            keys = np.add.reduceat(cell_keys, starts)
        block = {
            "row_uid": uids[starts],
            "dataset_id": table.column("dataset_id").to_numpy(zero_copy_only=False)[starts],
            "input": maxima[:, 0],
            "output": maxima[:, 1],
            "key": keys,
        }
        if carry is not None:
            if block["row_uid"][0] == carry["row_uid"][0]:
                block["input"][0] = max(block["input"][0], carry["input"][0])
                block["output"][0] = max(block["output"][0], carry["output"][0])
                with np.errstate(over="ignore"):
                    block["key"][0] = block["key"][0] + carry["key"][0]
            else:
                yield carry
        last = len(starts) - 1
        carry = {name: values[last:] for name, values in block.items()}
        yield {name: values[:last] for name, values in block.items()}
    if carry is not None:
        yield carry


def retrieve(
    datastore: Path,
    task: TaskSpec,
    out: Path,
    top_k: int = 3000,
    per_dataset_cap: int | None = None,
    embedder: str | None = None,
    pool_factor: int = 4,
) -> RetrieveSummary:
    """Score every row of the datastore exactly (streaming over its shards) and write the top K rows.

    The candidate pool keeps the best `pool_factor * top_k` unbanned rows while streaming; duplicates and
    the per-dataset cap are applied to that pool, best first."""
    started = time.monotonic()
    manifest = read_manifest(datastore)
    if embedder is not None and canonical_model_name(embedder) != manifest.embedder.name:
        raise RebaseError(
            f"{datastore} was built with embedder '{manifest.embedder.name}', not '{embedder}'; "
            "retrieve with the datastore's embedder"
        )
    total_rows = manifest.counts()["rows"]
    if top_k > total_rows:
        raise RebaseError(f"--top-k {top_k} is larger than the datastore ({total_rows} rows)")
    datasets = pq.read_table(datastore / "datasets.parquet", columns=["dataset_id", "description_embedding"])
    dataset_ids = datasets.column("dataset_id").to_pylist()
    for ban in task.ban:
        if not any(is_banned(d, [ban]) for d in dataset_ids):
            print(f"warning: ban '{ban}' matches no dataset in {datastore}", file=sys.stderr)

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model(manifest.embedder.name)), device=None)
    query = task_query(task, lambda texts: model.encode(texts, normalize_embeddings=True, convert_to_numpy=True))
    dimension = manifest.embedder.dimension
    description = embeddings_to_numpy(datasets.column("description_embedding"), dimension) @ query.instruction
    description_by_id = dict(zip(dataset_ids, description.tolist()))
    value_ids, value_sims = _value_similarities(datastore, query, dimension)

    pool: dict[str, np.ndarray] | None = None
    limit = pool_factor * top_k
    for block in _row_blocks(datastore, value_ids, value_sims):
        keep = np.array([not is_banned(d, task.ban) for d in block["dataset_id"]], dtype=bool)
        block = {name: values[keep] for name, values in block.items()}
        block["description"] = np.array([description_by_id[d] for d in block["dataset_id"]], dtype=np.float32)
        block["score"] = rebase_scores(block["input"], block["output"], block["description"])
        pool = block if pool is None else {name: np.concatenate([pool[name], block[name]]) for name in pool}
        if len(pool["score"]) > 2 * limit:
            best = np.argpartition(-pool["score"], limit)[:limit]
            pool = {name: values[best] for name, values in pool.items()}
    if pool is None or not len(pool["score"]):
        raise RebaseError(f"every row of {datastore} is banned by the task; nothing to retrieve")
    chosen = select_rows(pool["score"], pool["dataset_id"], pool["key"], top_k, per_dataset_cap=per_dataset_cap)
    selected = {name: values[chosen] for name, values in pool.items()}
    _write_retrieved(datastore, out, selected, task, top_k, per_dataset_cap)
    counts: dict[str, int] = {}
    for dataset_id in selected["dataset_id"]:
        counts[dataset_id] = counts.get(dataset_id, 0) + 1
    return RetrieveSummary(
        out=out,
        top_k=top_k,
        rows=len(chosen),
        datasets=len(counts),
        top_datasets=sorted(counts.items(), key=lambda item: -item[1]),
        score_range=(float(selected["score"].min()), float(selected["score"].max())) if chosen else (0.0, 0.0),
        seconds=time.monotonic() - started,
        mode="exact",
    )


def _write_retrieved(datastore: Path, out: Path, selected: dict, task: TaskSpec, top_k: int, cap: int | None) -> None:
    """The retrieved directory: rows.parquet (rank, ids, the three partial scores, the row) and stats.json."""
    uids = pa.array(selected["row_uid"].tolist(), pa.string())
    rows: dict[str, str] = {}
    for path in sorted((datastore / "rows").rglob("*.parquet")):
        table = pq.read_table(path, columns=["row_uid", "row"])
        table = table.filter(pc.is_in(table.column("row_uid"), value_set=uids))
        rows.update(zip(table.column("row_uid").to_pylist(), table.column("row").to_pylist()))
    table = pa.table(
        {
            "rank": pa.array(np.arange(1, len(uids) + 1), pa.int64()),
            "row_uid": uids,
            "dataset_id": pa.array(selected["dataset_id"].tolist(), pa.string()),
            "score": pa.array(selected["score"], pa.float32()),
            "input_score": pa.array(selected["input"], pa.float32()),
            "output_score": pa.array(selected["output"], pa.float32()),
            "description_score": pa.array(selected["description"], pa.float32()),
            "row": pa.array([rows[u] for u in uids.to_pylist()], pa.string()),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "_SUCCESS").unlink(missing_ok=True)
    write_parquet_atomic(out / "rows.parquet", table)
    write_json_atomic(
        out / "stats.json",
        {
            "task": task.name,
            "datastore": str(datastore),
            "top_k": top_k,
            "per_dataset_cap": cap,
            "rows": table.num_rows,
            "mode": "exact",
            "ban": task.ban,
        },
    )
    (out / "_SUCCESS").write_text("")
