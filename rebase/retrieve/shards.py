"""Approximate mode's machinery: FAISS index shards held by Ray actors (one per shard, searched in
parallel) and the cell map, loaded once and queried many times. The only Ray and FAISS code of retrieval."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rebase.datastore.index import merge_by_score
from rebase.datastore.manifest import read_manifest
from rebase.errors import RebaseError
from rebase.retrieve.cells import CellMap, positions, sorted_unique, sorted_unique_inverse
from rebase.retrieve.score import Candidates, TaskQuery, distinct_floor, group_maxima, rebase_scores, score_bounds


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
        found = np.where(ids != -1, positions(self.ids, ids), -1)  # -1: FAISS's padding
        scores = np.where(found >= 0, scores, -np.inf).astype(np.float32)
        if not every_query:
            return found, scores, None
        sims = np.full((*ids.shape, len(queries)), -np.inf, np.float32)
        sims[found >= 0] = self.similarities(found[found >= 0], queries)
        return found, scores, sims

    def similarities(self, positions: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """(n, queries): the dot products with the queries of the vectors at `positions` of `value_ids()`."""
        queries_t = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).T)
        sims = np.empty((len(positions), queries_t.shape[1]), np.float32)
        # In chunks that stay in cache (gathering tens of thousands of vectors into one fresh array cost 3 to
        # 5 times as much: page faults, memory traffic). numpy and FAISS release the GIL, so the shard's
        # threads share the chunks.
        workers = max(1, min(self.threads, -(-len(positions) // self.CHUNK)))
        bounds = np.linspace(0, len(positions), workers + 1).astype(int)
        if workers == 1:
            self._rescore(positions, queries_t, sims, 0, len(positions))
        else:
            spans = zip(bounds[:-1], bounds[1:])
            list(self.workers.map(lambda span: self._rescore(positions, queries_t, sims, *span), spans))
        return sims

    def _rescore(self, positions: np.ndarray, queries_t: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
        """`out[lo:hi]`: the similarities of the vectors at `positions[lo:hi]`, a chunk at a time."""
        buffer = np.empty((self.CHUNK, self.index.d), np.float32) if self.rows is None else None
        for start in range(lo, hi, self.CHUNK):
            part = positions[start : min(start + self.CHUNK, hi)]
            if self.rows is not None:
                vectors = self.rows[self.offsets[part]]
            else:
                vectors = buffer[: len(part)]
                self.index.reconstruct_batch(self.ids[part], vectors)
            np.matmul(vectors, queries_t, out=out[start : start + len(part)])


@dataclass(frozen=True)
class NearestValues:
    """What the shards' search found for the queries: the nearest `depth` value numbers over all shards
    with their scores ((queries, k), -1 and -inf past what the shards hold), the last score per query
    (-inf where every value was returned: nothing unseen is above it), and, for a score bound, every value
    any shard returned (`found`) with its similarity to each query (`found_similarities`)."""

    numbers: np.ndarray
    scores: np.ndarray
    ceiling: np.ndarray
    found: np.ndarray
    found_similarities: np.ndarray

    def values(self) -> np.ndarray:
        """The distinct value numbers among the nearest, sorted."""
        values = sorted_unique(self.numbers[self.scores > -np.inf])
        return values[values >= 0]


def merge_nearest(
    searched: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], shard_offsets: np.ndarray, depth: int
) -> NearestValues:
    """The shards' `ShardSearcher.search` results (positions, scores, similarities to every query or None)
    as value numbers (shard s's position p is number `shard_offsets[s] + p`), the nearest `depth` per query
    over all shards (a small shard must not add all it holds)."""
    numbers = [np.where(p >= 0, p + offset, -1) for (p, _, _), offset in zip(searched, shard_offsets)]
    scores, nearest = merge_by_score([s for _, s, _ in searched], numbers, depth)
    queries = len(scores)
    complete = scores.shape[1] < depth or not np.isfinite(scores[:, -1]).all()  # every value was found
    ceiling = np.full(queries, -np.inf, np.float32) if complete else scores[:, -1]
    found, found_sims = np.zeros(0, np.int64), np.zeros((0, queries), np.float32)
    if all(sims is not None for _, _, sims in searched):
        found = np.concatenate([n.ravel() for n in numbers])
        found_sims = np.concatenate([sims.reshape(-1, queries) for _, _, sims in searched])[found >= 0]
        found = found[found >= 0]
    return NearestValues(nearest, scores, ceiling, found, found_sims)


class ApproximateIndex:
    """The shards in Ray actors (one each, searched in parallel) and the cell map, loaded once."""

    TOLERANCE = 1e-5  # FAISS's and numpy's dot products of the same vectors may differ in the last bits

    def __init__(self, datastore: Path):
        import ray

        from rebase.ray_setup import SEARCHER_RETRIES, ensure_ray

        ensure_ray()
        manifest = read_manifest(datastore)
        complete = [entry for entry in manifest.sources if entry.state == "complete"]
        shards = [datastore / "index" / shard.file for entry in complete for shard in entry.shards]
        if not shards:
            raise RebaseError(f"{datastore} has no index shards; build it first")
        # Held in memory, busy only while a query runs: no CPU reserved.
        actor = ray.remote(num_cpus=0, **SEARCHER_RETRIES)(ShardSearcher)
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // len(shards))
        self.actors = [actor.remote(str(path), threads) for path in shards]
        self.exact = all(shard.kind == "flat" for entry in complete for shard in entry.shards)
        self.cells = CellMap.load(datastore, lambda: ray.get([a.value_ids.remote() for a in self.actors]))
        self.rescored = 0  # rows re-scored by the last query
        self.known_table: np.ndarray | None = None

    def __enter__(self) -> ApproximateIndex:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def candidates(
        self,
        query: TaskQuery,
        description_by_id: dict[str, float],
        limit: int,
        depth: int,
        dataset_rows: int = 0,
        keep: int | None = None,
    ) -> Candidates:
        """The best `limit` rows among the candidates, re-scored exactly: the rows holding the `depth`
        nearest values of each query, and `dataset_rows` rows of the datasets whose descriptions are
        closest to the instruction (whole datasets, best first); rows of a dataset scored -inf (banned, see
        `apply_bans`) never. With `keep` (the caller selects the best `keep` rows with distinct keys, no
        per-dataset cap) only rows that can be among them are returned, and where every shard is exact
        (flat) a candidate whose score bound shows that it cannot be is dropped before re-scoring (an
        approximate shard can miss values above the bound)."""
        queries = np.stack([query.input, query.output])
        bound = bool(keep) and self.exact  # a value not found is at most the last score only if search is exact
        nearest = self._search(queries, depth, bound)
        priority = self.cells.dataset_scores(description_by_id)
        # A value shared by many rows (a label) brings at most as many rows as are kept, those of the most
        # relevant datasets first: beyond that its rows could not all be kept anyway.
        rows = self.cells.candidate_rows(nearest.values(), priority, limit, dataset_rows)
        if bound and len(rows):
            rows = rows[self._may_be_kept(nearest, rows, priority, keep)]
        self.rescored = len(rows)
        starts, values = self.cells.cells_of(rows)
        unique_values, inverse = sorted_unique_inverse(values)
        maxima = group_maxima(starts, self._similarities(unique_values, queries)[inverse])
        description = priority[self.cells.row_dataset_codes[rows]]  # finite: banned rows were never taken
        scores = rebase_scores(maxima[:, 0], maxima[:, 1], description)
        best = np.arange(len(rows))
        if keep:  # only rows at or above the keep-th distinct score can be selected
            best = np.flatnonzero(scores >= distinct_floor(scores, self.cells.row_keys[rows], keep))
        if len(best) > limit:  # the best `limit` rows, before gathering their ids
            best = best[np.argpartition(-scores[best], limit)[:limit]]
        return self.cells.candidates(rows[best], maxima[best], description[best], scores[best])

    def _search(self, queries: np.ndarray, depth: int, every_query: bool) -> NearestValues:
        """Every shard's `depth` nearest values of each query, merged; with `every_query`, each value found
        with its similarity to every query."""
        import ray

        searched = ray.get([actor.search.remote(queries, depth, every_query) for actor in self.actors])
        return merge_nearest(searched, self.cells.shard_offsets, depth)

    def _may_be_kept(self, nearest: NearestValues, rows: np.ndarray, priority: np.ndarray, keep: int) -> np.ndarray:
        """Which of `rows` can be among the best `keep` rows with distinct keys, by bounds of their scores
        from the search alone (exact shards only: see `score_bounds`)."""
        starts, values = self.cells.cells_of(rows)
        known = self._known(nearest.found, nearest.found_similarities, values)
        description = priority[self.cells.row_dataset_codes[rows]]
        low, high = score_bounds(starts, known, nearest.ceiling, description)
        return high >= distinct_floor(low, self.cells.row_keys[rows], keep) - self.TOLERANCE

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

    def _similarities(self, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """(len(values), queries): the similarities of the value numbers `values` (sorted, distinct) to the
        queries, each shard asked for its own; -inf for number -1 (a value no shard holds)."""
        import ray

        sims = np.full((len(values), len(queries)), -np.inf, np.float32)
        bounds = np.searchsorted(values, self.cells.shard_offsets)  # numbers -1 (no shard) come first
        asked = [
            (bounds[s], bounds[s + 1], actor.similarities.remote(values[bounds[s] : bounds[s + 1]] - offset, queries))
            for s, (actor, offset) in enumerate(zip(self.actors, self.cells.shard_offsets))
            if bounds[s + 1] > bounds[s]
        ]
        for (lo, hi, _), found in zip(asked, ray.get([ref for _, _, ref in asked])):
            sims[lo:hi] = found
        return sims
