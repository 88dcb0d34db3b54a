"""The ReBase score (Ge et al. 2024) as plain functions on numpy arrays, with bans and row selection.

For a task with instruction I and examples (x_j, y_j), a row r of dataset D scores
    score(r) = ( max_cells mean_j s(x_j, c) + max_cells mean_j s(y_j, c) + s(I, description(D)) ) / 3
With unit vectors, mean_j s(x_j, c) = (mean_j e(x_j)) . e(c): one dot product with the mean example
vector per cell, so a task needs two cell queries and one dataset query.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rebase.datastore.index import merge_by_score
from rebase.datastore.manifest import read_manifest
from rebase.errors import RebaseError
from rebase.io import embeddings_to_numpy, iter_parquet, write_parquet_atomic
from rebase.models import canonical_model_name, resolve_model
from rebase.stage import StageDir
from rebase.task import TaskSpec, is_banned

_OWN_FILES = frozenset({"rows.parquet", "stats.json", "_SUCCESS"})

if TYPE_CHECKING:
    from rebase.config import RetrieveConfig

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


def group_maxima(starts: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """Like `row_maxima` for cells already grouped by row, each row's cells from its entry of `starts`
    (increasing, every row with at least one cell) to the next: one reduction, no scatter."""
    if not len(starts):
        return np.zeros((0, similarities.shape[1]), np.float32)
    return np.maximum.reduceat(similarities, starts, axis=0).astype(np.float32, copy=False)


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
    if per_dataset_cap is None:  # bans and duplicates alone: each key's first unbanned row, in array steps
        if bans and len(order):
            names, codes = np.unique(np.asarray(dataset_ids, dtype=str)[order], return_inverse=True)
            order = order[~np.array([is_banned(name, bans) for name in names])[codes]]
        first = np.unique(np.asarray(duplicate_keys)[order], return_index=True)[1] if len(order) else order
        return order[np.sort(first)[:top_k]].tolist()
    kept: list[int] = []
    seen: set[object] = set()
    per_dataset: dict[str, int] = {}
    banned: dict[str, bool] = {}
    for index in order:
        dataset_id = dataset_ids[index]
        if dataset_id not in banned:
            banned[dataset_id] = is_banned(dataset_id, bans)
        if banned[dataset_id]:
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


def _rows_of_cells(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For cells grouped by row: row_uid per cell, each row's first cell, each cell's row number, and a
    key per row that is equal for rows with the same (column, value) pairs (to collapse exact duplicates)."""
    uids = table.column("row_uid").to_numpy(zero_copy_only=False)
    new_row = np.r_[True, uids[1:] != uids[:-1]]
    starts = np.flatnonzero(new_row)
    columns = table.column("column").to_pylist()
    cell_keys = np.array([hash(c) & 0xFFFFFFFFFFFFFFFF for c in columns], dtype=np.uint64)
    with np.errstate(over="ignore"):
        cell_keys = cell_keys * ROW_CODE_PRIME + table.column("value_id").to_numpy().view(np.uint64)
        keys = np.add.reduceat(cell_keys, starts)
    return uids, starts, np.cumsum(new_row) - 1, keys


def _row_blocks(datastore: Path, value_ids: np.ndarray, value_sims: np.ndarray):
    """Per-row (row_uid, dataset_id, input max, output max, duplicate key) in blocks, streamed over the cells.

    A row's cells are consecutive; a row cut by a part boundary is held back and merged with the next part."""
    carry = None
    for path in sorted((datastore / "cells").rglob("*.parquet")):
        table = pq.read_table(path, columns=["row_uid", "dataset_id", "column", "value_id"])
        if table.num_rows == 0:
            continue
        uids, starts, codes, keys = _rows_of_cells(table)
        positions = np.searchsorted(value_ids, table.column("value_id").to_numpy())
        sims = value_sims[np.minimum(positions, len(value_ids) - 1)]
        maxima = group_maxima(starts, sims)
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


def _scored(block: dict, bans: Sequence[str], description_by_id: dict[str, float]) -> dict:
    """Drop banned rows from a block of rows and add their description similarity and ReBase score."""
    names, codes = np.unique(block["dataset_id"], return_inverse=True)  # a few datasets, many rows
    banned = np.array([is_banned(name, bans) for name in names], dtype=bool)
    description = np.array([description_by_id[name] for name in names], dtype=np.float32)
    keep = ~banned[codes]
    block = {name: values[keep] for name, values in block.items()}
    block["description"] = description[codes[keep]]
    block["score"] = rebase_scores(block["input"], block["output"], block["description"])
    return block


def exact_pool(
    datastore: Path,
    query: TaskQuery,
    bans: Sequence[str],
    description_by_id: dict[str, float],
    limit: int,
    dimension: int,
) -> dict | None:
    """Every row scored, streaming over values and cells; the best `limit` unbanned rows are kept."""
    value_ids, value_sims = _value_similarities(datastore, query, dimension)
    pool: dict[str, np.ndarray] | None = None
    for block in _row_blocks(datastore, value_ids, value_sims):
        block = _scored(block, bans, description_by_id)
        pool = block if pool is None else {name: np.concatenate([pool[name], block[name]]) for name in pool}
        if len(pool["score"]) > 2 * limit:
            best = np.argpartition(-pool["score"], limit)[:limit]
            pool = {name: values[best] for name, values in pool.items()}
    return pool


def description_similarities(datastore: Path, query: TaskQuery, dimension: int) -> dict[str, float]:
    datasets = pq.read_table(datastore / "datasets.parquet", columns=["dataset_id", "description_embedding"])
    vectors = embeddings_to_numpy(datasets.column("description_embedding"), dimension)
    return dict(zip(datasets.column("dataset_id").to_pylist(), (vectors @ query.instruction).tolist()))


def retrieve(
    datastore: Path,
    task: TaskSpec,
    out: Path,
    top_k: int = 3000,
    per_dataset_cap: int | None = None,
    embedder: str | None = None,
    exact: bool = False,
    depth: int = 4000,
    pool_factor: int = 4,
    dataset_rows: int | None = None,
) -> RetrieveSummary:
    """Retrieve the top K rows of the datastore for a task and write the retrieved directory.

    Exact mode scores every row, streaming over the store. Approximate mode (default) takes the `depth`
    nearest cell values of each query vector from every index shard in parallel, gathers the rows holding
    them, adds the rows of the datasets whose descriptions are closest to the instruction (`dataset_rows`
    rows in all, default 2 * top_k: a third of the score is the description's, and rows it carries can
    have no near cell) and re-scores those rows exactly. Either way the best `pool_factor * top_k`
    unbanned rows are kept, then duplicates and the per-dataset cap are applied, best first."""
    if dataset_rows is None:
        dataset_rows = 2 * top_k
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
    mode = "exact" if exact else "approximate"
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                task.model_dump(mode="json"),
                str(datastore.resolve()),
                manifest.updated,
                top_k,
                per_dataset_cap,
                mode,
                None if exact else depth,
                pool_factor,
                None if exact else dataset_rows,
            ]
        ).encode()
    ).hexdigest()
    done = StageDir(out, "a rebase retrieval", _OWN_FILES).check(fingerprint)
    if done is not None:
        return RetrieveSummary(
            out,
            top_k,
            done["rows"],
            len(done["datasets"]),
            list(done["datasets"].items()),
            tuple(done["score_range"]),
            time.monotonic() - started,
            mode + ", already done",
        )

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model(manifest.embedder.name)), device=None)
    query = task_query(task, lambda texts: model.encode(texts, normalize_embeddings=True, convert_to_numpy=True))
    dimension = manifest.embedder.dimension
    description_by_id = description_similarities(datastore, query, dimension)
    for ban in task.ban:
        if not any(is_banned(d, [ban]) for d in description_by_id):
            print(f"warning: ban '{ban}' matches no dataset in {datastore}", file=sys.stderr)
    limit = pool_factor * top_k
    if exact:
        pool = exact_pool(datastore, query, task.ban, description_by_id, limit, dimension)
    else:
        with ApproximateIndex(datastore) as index:
            keep = top_k if per_dataset_cap is None else None  # the bound assumes no cap
            pool = index.pool(query, task.ban, description_by_id, limit, depth, dataset_rows, keep)
    if pool is None or not len(pool["score"]):
        raise RebaseError(f"every row of {datastore} is banned by the task; nothing to retrieve")
    selected = best_rows(pool, top_k, per_dataset_cap)
    counts = Counter(selected["dataset_id"].tolist())
    top_datasets = counts.most_common()
    score_range = (float(selected["score"].min()), float(selected["score"].max()))
    stats = {
        "task": task.name,
        "datastore": str(datastore),
        "top_k": top_k,
        "per_dataset_cap": per_dataset_cap,
        "mode": mode,
        "depth": None if exact else depth,
        "dataset_rows": None if exact else dataset_rows,
        "ban": task.ban,
        "rows": len(selected["row_uid"]),
        "datasets": dict(top_datasets),
        "score_range": score_range,
        "fingerprint": fingerprint,
        "seconds": round(time.monotonic() - started, 2),
    }
    _write_retrieved(datastore, out, selected, stats)
    return RetrieveSummary(
        out, top_k, len(selected["row_uid"]), len(counts), top_datasets, score_range, time.monotonic() - started, mode
    )


def retrieve_stage(config: RetrieveConfig) -> RetrieveSummary:
    """`retrieve` as `rebase retrieve` and the pipeline's retrieve stage call it."""
    from rebase.task import load_task

    return retrieve(
        config.datastore,
        load_task(config.task),
        config.out,
        top_k=config.top_k,
        per_dataset_cap=config.per_dataset_cap,
        embedder=config.embedder,
        exact=config.exact,
        depth=config.depth,
        dataset_rows=config.dataset_rows,
    )


def best_rows(pool: dict, top_k: int, per_dataset_cap: int | None = None) -> dict:
    """The pool's top K rows after duplicates and the cap, best first; equal scores by row_uid, so runs agree."""
    order = np.argsort(-pool["score"], kind="stable")
    scores = pool["score"][order]
    tied = np.r_[False, scores[1:] == scores[:-1]] | np.r_[scores[:-1] == scores[1:], False]
    if tied.any():  # equal scores (duplicate rows, shared cells): only those are ordered by row_uid
        where = np.flatnonzero(tied)
        group = np.cumsum(np.r_[True, scores[1:] != scores[:-1]])[where]
        order[where] = order[where][np.lexsort((pool["row_uid"][order[where]].astype(str), group))]
    pool = {name: values[order] for name, values in pool.items()}
    chosen = select_rows(pool["score"], pool["dataset_id"], pool["key"], top_k, per_dataset_cap=per_dataset_cap)
    return {name: values[chosen] for name, values in pool.items()}


# ---------------------------------------------------------------- approximate retrieval


def _shard_vectors(index) -> tuple[np.ndarray, np.ndarray | None]:
    """The value ids a FAISS shard holds (IDMap2-wrapped flat/HNSW, or IVF) and, where FAISS keeps the
    vectors as plain float32 rows (flat storage, IVF-Flat array lists), the memory address of each."""
    import faiss

    if isinstance(index, faiss.IndexIDMap2):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        inner = faiss.downcast_index(index.index)
        storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
        if not isinstance(storage, faiss.IndexFlat) or storage.ntotal != len(ids):
            return ids, None
        return ids, int(storage.get_xb()) + np.arange(len(ids), dtype=np.int64) * storage.code_size
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    sizes = np.array([lists.list_size(number) for number in range(ivf.nlist)], dtype=np.int64)
    used = np.flatnonzero(sizes)
    ids = [
        faiss.rev_swig_ptr(faiss.cast_integer_to_idx_t_ptr(int(lists.get_ids(int(n)))), int(sizes[n])).copy()
        for n in used
    ]
    ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    if not isinstance(ivf, faiss.IndexIVFFlat) or not isinstance(lists, faiss.ArrayInvertedLists):
        return ids, None
    starts = np.array([int(lists.get_codes(int(n))) for n in used], dtype=np.int64)
    within = np.arange(len(ids), dtype=np.int64) - np.repeat(np.cumsum(sizes[used]) - sizes[used], sizes[used])
    return ids, np.repeat(starts, sizes[used]) + within * ivf.code_size


class ShardSearcher:
    """One index shard held in memory (a Ray actor per shard): nearest values, and similarities of stored
    vectors by position in the shard's sorted value ids."""

    CHUNK = 256  # vectors re-scored at a time (384 KB at 384 dimensions; 1,024 was 20% slower, 2,048 twice)

    def __init__(self, path: str, threads: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        import faiss

        from rebase.datastore.index import load_shard

        faiss.omp_set_num_threads(threads)  # several shards share a node's cores: no oversubscription
        self.index = load_shard(Path(path))
        ids, addresses = _shard_vectors(self.index)
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        self.threads = threads
        self.workers = ThreadPoolExecutor(threads)
        self.rows, self.offsets = None, None
        if addresses is not None and len(ids):
            self._read_in_place(addresses[order])

    def _read_in_place(self, addresses: np.ndarray) -> None:
        """Gather vectors straight from FAISS's memory instead of `reconstruct_batch` (a hash lookup and a
        copy through a fresh buffer per vector: 2 to 3 times slower). `rows` is a strided float32 view whose
        row at word offset o is the vector stored at base + 4 o; only offsets of stored vectors are ever
        read, the index is never changed while loaded (so FAISS never moves them), and the view is checked
        against `reconstruct` on a sample before it is used."""
        import faiss
        from numpy.lib.stride_tricks import as_strided

        base = int(addresses.min())
        if ((addresses - base) % 4).any():
            return  # not float-aligned relative to each other (FAISS's own allocations always are)
        words = (int(addresses.max()) - base) // 4 + self.index.d
        memory = faiss.rev_swig_ptr(faiss.cast_integer_to_float_ptr(base), words)
        rows = as_strided(memory, shape=(words - self.index.d + 1, self.index.d), strides=(4, 4), writeable=False)
        offsets = (addresses - base) // 4
        sample = np.linspace(0, len(self.ids) - 1, min(64, len(self.ids))).astype(np.int64)
        expected = np.empty((len(sample), self.index.d), np.float32)
        self.index.reconstruct_batch(self.ids[sample], expected)
        if np.array_equal(rows[offsets[sample]], expected):
            self.rows, self.offsets = rows, offsets

    def value_ids(self) -> np.ndarray:
        """The value ids this shard holds, sorted: `similarities` takes positions in this array."""
        return self.ids

    def search(
        self, queries: np.ndarray, depth: int, every_query: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """This shard's `depth` nearest values of each query: their positions in `value_ids()` and scores,
        each (queries, k), -1 and -inf where it holds fewer; with `every_query`, also each found value's
        similarity to every query, (queries, k, queries)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(depth, len(self.ids))
        if not k:
            cross = np.zeros((len(queries), 0, len(queries)), np.float32) if every_query else None
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32), cross
        scores, ids = self.index.search(queries, k)
        positions = np.where(ids != -1, _positions(self.ids, ids), -1)  # -1: FAISS's padding
        scores = np.where(positions >= 0, scores, -np.inf).astype(np.float32)
        if not every_query:
            return positions, scores, None
        sims = np.full((*ids.shape, len(queries)), -np.inf, np.float32)
        sims[positions >= 0] = self.similarities(positions[positions >= 0], queries)
        return positions, scores, sims

    def similarities(self, positions: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """(n, queries): the dot products with the queries of the vectors at `positions` of `value_ids()`."""
        queries_t = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).T)
        sims = np.empty((len(positions), queries_t.shape[1]), np.float32)
        # In chunks that stay in cache (gathering tens of thousands of vectors into one fresh array cost 3 to
        # 5 times as much: page faults, memory traffic). numpy and FAISS release the GIL, so the shard's
        # threads share the chunks.
        workers = max(1, min(self.threads, -(-len(positions) // self.CHUNK)))
        bounds = np.linspace(0, len(positions), workers + 1).astype(int)

        def rescore(lo: int, hi: int) -> None:
            buffer = np.empty((self.CHUNK, self.index.d), np.float32) if self.rows is None else None
            for start in range(lo, hi, self.CHUNK):
                part = positions[start : min(start + self.CHUNK, hi)]
                if self.rows is not None:
                    vectors = self.rows[self.offsets[part]]
                else:
                    vectors = buffer[: len(part)]
                    self.index.reconstruct_batch(self.ids[part], vectors)
                np.matmul(vectors, queries_t, out=sims[start : start + len(part)])

        if workers == 1:
            rescore(0, len(positions))
        else:
            list(self.workers.map(rescore, bounds[:-1], bounds[1:]))
        return sims


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
        tables = [
            pq.read_table(path, columns=["row_uid", "dataset_id", "column", "value_id"])
            for path in sorted((datastore / "cells").rglob("*.parquet"))
        ]
        table = pa.concat_tables(tables)
        uids, starts, row_of_cell, keys = _rows_of_cells(table)
        shard_ids = shard_ids()
        shard_offsets = np.r_[0, np.cumsum([len(ids) for ids in shard_ids])].astype(np.int64)
        all_ids = np.concatenate([*shard_ids, np.zeros(0, np.int64)]).astype(np.int64)
        id_order = np.argsort(all_ids, kind="stable")
        found = _positions(all_ids[id_order], table.column("value_id").to_numpy())
        values = np.full(len(found), -1, np.int64)
        values[found >= 0] = id_order[found[found >= 0]]
        order = np.argsort(values, kind="stable")
        row_datasets = table.column("dataset_id").to_numpy()[starts]
        dataset_names, dataset_codes = np.unique(row_datasets, return_inverse=True)
        return cls(
            row_uids=uids[starts],
            row_datasets=row_datasets,
            row_dataset_codes=dataset_codes,
            dataset_names=dataset_names.tolist(),
            row_keys=keys,
            row_offsets=np.r_[starts, len(values)],
            cell_values=values,
            sorted_values=values[order],
            sorted_rows=row_of_cell[order],
            dataset_rows=np.argsort(dataset_codes, kind="stable"),
            dataset_offsets=np.r_[0, np.cumsum(np.bincount(dataset_codes, minlength=len(dataset_names)))],
            shard_offsets=shard_offsets,
        )

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


def _positions(sorted_ids: np.ndarray, value_ids: np.ndarray) -> np.ndarray:
    """Where each of `value_ids` stands in `sorted_ids` (same shape as `value_ids`), -1 where it is absent.
    The keys are searched in sorted order, so searchsorted walks `sorted_ids` in one direction (0.6 instead
    of 2.6 ms for 8,000 random ids among 750,000)."""
    keys = np.ravel(value_ids)
    if not len(sorted_ids):
        return np.full(np.shape(value_ids), -1, np.int64)
    order = np.argsort(keys)
    positions = np.empty(len(keys), np.int64)
    positions[order] = np.minimum(np.searchsorted(sorted_ids, keys[order]), len(sorted_ids) - 1)
    return np.where(sorted_ids[positions] == keys, positions, -1).reshape(np.shape(value_ids))


def sorted_unique(values: np.ndarray, inverse: bool = False):
    """`np.unique(values[, return_inverse=True])` by sorting: numpy 2's hash-based unique is several times
    slower on these integer arrays (2.7 against 0.2 ms for 30,000 row numbers)."""
    order = np.argsort(values)
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]] if len(values) else np.zeros(0, bool)
    if not inverse:
        return ordered[first]
    positions = np.empty(len(values), np.int64)
    positions[order] = np.cumsum(first) - 1
    return ordered[first], positions


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The positions start, start+1, ..., start+count-1 of every (start, count), concatenated."""
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + within


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


class ApproximateIndex:
    """The shards in Ray actors (one each, searched in parallel) and the cell map, loaded once."""

    TOLERANCE = 1e-5  # FAISS's and numpy's dot products of the same vectors may differ in the last bits

    def __init__(self, datastore: Path, per_value_rows: int | None = None):
        import ray

        from rebase.ray_setup import SEARCHER_RETRIES, ensure_ray

        ensure_ray()
        manifest = read_manifest(datastore)
        shards = [datastore / "index" / s.file for e in manifest.sources if e.state == "complete" for s in e.shards]
        if not shards:
            raise RebaseError(f"{datastore} has no index shards; build it first")
        actor = ray.remote(num_cpus=0, **SEARCHER_RETRIES)(
            ShardSearcher
        )  # held in memory, busy only while a query runs
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // len(shards))
        self.actors = [actor.remote(str(path), threads) for path in shards]
        self.exact = all(s.kind == "flat" for e in manifest.sources if e.state == "complete" for s in e.shards)
        self.cells = CellMap.load(datastore, lambda: ray.get([a.value_ids.remote() for a in self.actors]))
        self.per_value_rows = per_value_rows
        self.rescored = 0  # rows re-scored by the last query
        self.known_table: np.ndarray | None = None

    def _known(self, found: np.ndarray, found_sims: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(len(values), queries): the similarities of the values the search found (numbers `found`, with
        `found_sims`), -inf for the others and for number -1. Looked up in a table over every value number
        (one more row, always -inf, for -1) that is -inf between queries: the cost follows the values asked,
        not the store."""
        if self.known_table is None or self.known_table.shape[1] != found_sims.shape[1]:
            self.known_table = np.full((self.cells.shard_offsets[-1] + 1, found_sims.shape[1]), -np.inf, np.float32)
        self.known_table[found] = found_sims
        try:
            return self.known_table[values]
        finally:
            self.known_table[found] = -np.inf

    def __enter__(self) -> ApproximateIndex:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def pool(
        self,
        query: TaskQuery,
        bans: Sequence[str],
        description_by_id: dict[str, float],
        limit: int,
        depth: int,
        dataset_rows: int = 0,
        keep: int | None = None,
    ) -> dict | None:
        """The best `limit` unbanned rows among the candidates, re-scored exactly: the rows holding the
        `depth` nearest values of each query, and `dataset_rows` rows of the datasets whose descriptions
        are closest to the instruction (whole datasets, best first). With `keep` (the caller selects the
        best `keep` rows with distinct keys, no per-dataset cap) only rows that can be among them are
        returned, and where every shard is exact (flat) a candidate whose score bound shows that it cannot
        be is dropped before re-scoring (an approximate shard can miss values above the bound)."""
        import ray

        queries = np.stack([query.input, query.output])
        bound = bool(keep) and self.exact  # a value not found is at most the last score only if search is exact
        searched = ray.get([actor.search.remote(queries, depth, bound) for actor in self.actors])
        numbers = [np.where(p >= 0, p + o, -1) for (p, _, _), o in zip(searched, self.cells.shard_offsets)]
        # The nearest `depth` values over all shards, per query (a small shard must not add all it holds).
        scores, nearest = merge_by_score([s for _, s, _ in searched], numbers, depth)
        candidates = sorted_unique(nearest[scores > -np.inf])
        per_dataset = np.array(
            [-np.inf if is_banned(name, bans) else description_by_id[name] for name in self.cells.dataset_names],
            dtype=np.float32,
        )
        # A value shared by many rows (a label) brings at most as many rows as the pool keeps, those of the
        # most relevant datasets first: beyond that its rows could not all make the pool anyway.
        per_value = self.per_value_rows or limit
        rows = self.cells.rows_holding(candidates[candidates >= 0], per_value, per_dataset)
        if dataset_rows:
            rows = sorted_unique(np.concatenate([rows, self.cells.rows_of_best_datasets(per_dataset, dataset_rows)]))
        if not len(rows):
            return None
        starts, values = self.cells.cells_of(rows)
        description = per_dataset[self.cells.row_dataset_codes[rows]]  # finite: banned rows were never taken
        if bound:
            complete = scores.shape[1] < depth or not np.isfinite(scores[:, -1]).all()  # every value was found
            ceiling = np.full(len(queries), -np.inf, np.float32) if complete else scores[:, -1]
            found = np.concatenate([n.ravel() for n in numbers])
            found_sims = np.concatenate([sims.reshape(-1, len(queries)) for _, _, sims in searched])[found >= 0]
            low, high = score_bounds(starts, self._known(found[found >= 0], found_sims, values), ceiling, description)
            needed = high >= distinct_floor(low, self.cells.row_keys[rows], keep) - self.TOLERANCE
            if not needed.all():
                counts = np.diff(np.r_[starts, len(values)])
                values = values[np.repeat(needed, counts)]
                rows, description, counts = rows[needed], description[needed], counts[needed]
                starts = np.cumsum(counts) - counts
        self.rescored = len(rows)
        unique_values, inverse = sorted_unique(values, inverse=True)
        value_sims = np.full((len(unique_values), len(queries)), -np.inf, np.float32)
        bounds = np.searchsorted(unique_values, self.cells.shard_offsets)  # numbers -1 (no shard) come first
        asked = [
            (
                bounds[s],
                bounds[s + 1],
                actor.similarities.remote(unique_values[bounds[s] : bounds[s + 1]] - offset, queries),
            )
            for s, (actor, offset) in enumerate(zip(self.actors, self.cells.shard_offsets))
            if bounds[s + 1] > bounds[s]
        ]
        for (lo, hi, _), sims in zip(asked, ray.get([ref for _, _, ref in asked])):
            value_sims[lo:hi] = sims
        maxima = group_maxima(starts, value_sims[inverse])
        scores = rebase_scores(maxima[:, 0], maxima[:, 1], description)
        if keep:  # only rows at or above the keep-th distinct score can be selected
            best = np.flatnonzero(scores >= distinct_floor(scores, self.cells.row_keys[rows], keep))
            rows, maxima, description, scores = rows[best], maxima[best], description[best], scores[best]
        if len(scores) > limit:  # the best `limit` rows, before gathering their ids
            best = np.argpartition(-scores, limit)[:limit]
            rows, maxima, description, scores = rows[best], maxima[best], description[best], scores[best]
        return {
            "row_uid": self.cells.row_uids[rows],
            "dataset_id": self.cells.row_datasets[rows],
            "input": maxima[:, 0],
            "output": maxima[:, 1],
            "key": self.cells.row_keys[rows],
            "description": description,
            "score": scores,
        }


def _write_retrieved(datastore: Path, out: Path, selected: dict, stats: dict) -> None:
    """The retrieved directory: rows.parquet (rank, ids, the three partial scores, the row), stats.json."""
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
    stage = StageDir(out, "a rebase retrieval", _OWN_FILES)
    stage.begin(stats["fingerprint"])
    write_parquet_atomic(out / "rows.parquet", table)
    stage.finish(stats)
