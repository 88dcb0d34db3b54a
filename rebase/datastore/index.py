"""FAISS shards over the distinct cell values' vectors (ids are value ids, inner product = cosine).

A store is a list of shards; each is built by one Ray task from a run of values blocks and saved as
its own file, so shards can be built, held and searched on different nodes and merged by score.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from rebase.io import embeddings_to_numpy, iter_parquet, parquet_rows, write_bytes_atomic


def resolve_kind(requested: str, vectors: int, flat_max_vectors: int) -> str:
    """`auto` is exact (flat) for shards up to `flat_max_vectors`, IVF above."""
    if requested != "auto":
        return requested
    return "flat" if vectors <= flat_max_vectors else "ivf"


def ivf_lists(vectors: int) -> int:
    """About 4*sqrt(n) inverted lists, with at least 39 training points per list (FAISS's minimum)."""
    return max(1, min(int(4 * math.sqrt(vectors)), vectors // 39))


def read_cell_vectors(value_files: list[Path], dimension: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and vectors of the cell values (not descriptions) in some values blocks."""
    ids, vectors = [], []
    for batch in iter_parquet(value_files, columns=["value_id", "kind", "embedding"]):
        mask = pc.equal(batch.column("kind"), "cell")
        batch = batch.filter(mask)
        ids.append(batch.column("value_id").to_numpy())
        vectors.append(embeddings_to_numpy(batch.column("embedding"), dimension))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, dimension), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(vectors)


def make_index(kind: str, vectors: np.ndarray, ids: np.ndarray):
    """A trained FAISS index holding `vectors` under `ids`; IVF trains on the GPU when one is present."""
    import faiss

    dimension = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
    elif kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 80
        index = faiss.IndexIDMap2(graph)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dimension)
        index = faiss.IndexIVFFlat(quantizer, dimension, ivf_lists(len(vectors)), faiss.METRIC_INNER_PRODUCT)
        index.train(_train_sample(vectors, index.nlist))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # lets retrieval reconstruct a vector by id
    else:
        raise ValueError(f"unknown index kind {kind}")
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index


def _train_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    limit = 256 * nlist
    if len(vectors) > limit:
        rows = np.random.default_rng(0).choice(len(vectors), limit, replace=False)
        vectors = vectors[np.sort(rows)]
    return vectors


def _gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_shard(value_files: list[str], out_file: str, kind: str, dimension: int) -> dict:
    """Build and save one shard from values blocks; returns its manifest entry."""
    import faiss

    ids, vectors = read_cell_vectors([Path(f) for f in value_files], dimension)
    index = _make_ivf_on_gpu(vectors, ids) if kind == "ivf" and _gpu_count() else make_index(kind, vectors, ids)
    write_bytes_atomic(Path(out_file), lambda tmp: faiss.write_index(index, tmp))
    return {
        "file": Path(out_file).name,
        "kind": kind,
        "vectors": int(len(ids)),
        "nlist": int(index.nlist) if kind == "ivf" else None,
    }


def _make_ivf_on_gpu(vectors: np.ndarray, ids: np.ndarray):
    """Train and fill an IVF shard on GPU 0, then bring it back to the CPU to save (faiss-gpu only)."""
    import faiss

    dimension = vectors.shape[1]
    cpu = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(dimension), dimension, ivf_lists(len(vectors)), faiss.METRIC_INNER_PRODUCT
    )
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    gpu.train(_train_sample(vectors, cpu.nlist))
    gpu.add_with_ids(vectors, ids)
    index = faiss.index_gpu_to_cpu(gpu)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def load_shard(path: Path, nprobe: int | None = None):
    import faiss

    index = faiss.read_index(str(path))
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = 128
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe or max(1, ivf.nlist // 8)
    return index


def group_blocks(blocks: list[Path], shard_vectors: int) -> list[tuple[list[Path], int]]:
    """Consecutive values blocks grouped into shards of at most `shard_vectors` vectors (a larger block
    is a shard of its own), each with its vector count."""
    groups: list[tuple[list[Path], int]] = []
    for block in blocks:
        rows = parquet_rows(block)
        if not groups or groups[-1][1] + rows > shard_vectors:
            groups.append(([], 0))
        members, size = groups[-1]
        groups[-1] = ([*members, block], size + rows)
    return groups


def merge_by_score(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the top-k of several shards' (scores, ids) results; FAISS's -1 padding scores -inf
    (a test on the id itself, since value ids may be negative)."""
    merged_scores = np.concatenate(scores, axis=1)
    merged_ids = np.concatenate(ids, axis=1)
    merged_scores = np.where(merged_ids == -1, -np.inf, merged_scores)
    order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(merged_scores, order, 1), np.take_along_axis(merged_ids, order, 1)


def search_shards(shard_paths: list[Path], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, value ids) over all shards, merged by score; -1 ids pad missing results."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not shard_paths:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    results = [load_shard(path).search(queries, k) for path in shard_paths]
    return merge_by_score([r[0] for r in results], [r[1] for r in results], k)
