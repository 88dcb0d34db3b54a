"""Exact vs approximate retrieval latency and agreement on a datastore of at least 1,000,000 cells.

    python benchmarks/retrieve.py [--rows 250000] [--top-k N] [--depth N] [--index KIND]

The datastore is synthetic at scale (stated in the output): random rows of four cells whose vectors come
from 2,000 topic clusters (384 dimensions, unit length), 1,000 datasets with description vectors, and
a few label values repeated across many rows, written in rebase's on-disk layout and indexed with the
real shard builder, grouped and typed as `rebase datastore build` does by default (`--index auto
--shard-vectors 1000000`: one IVF shard here); `--index flat --shard-vectors 150000` gives exact flat
shards, where the approximation measured is the candidate step alone. The query is a task whose example
inputs and outputs come from two topics. Both modes run in this process on the same store:
- exact: `exact_candidates`, streaming every values block and every cells part from disk;
- approximate: `ApproximateIndex` (one Ray actor per shard, cell map in memory), timed warm (the
  loaded index answering a query) and cold (loading included).
Printed: latency of each, the speed-up, the overlap of the approximate top-K with the exact top-K, and
peak memory (RSS of this process and its children, sampled every 0.1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from peak_memory import PeakMemory  # benchmarks/ is on sys.path when run as a script

from rebase.config import DatastoreConfig, RetrieveConfig
from rebase.datastore.build import CELL_SCHEMA, ROW_SCHEMA
from rebase.datastore.index import build_shard, group_blocks, resolve_kind
from rebase.datastore.manifest import Embedder, Manifest, Settings, Shard, SourceEntry, write_manifest
from rebase.io import numpy_to_embeddings, write_parquet_atomic
from rebase.retrieve.exact import exact_candidates
from rebase.retrieve.score import TaskQuery, apply_bans, best_rows
from rebase.retrieve.shards import ApproximateIndex

DIMENSION = 384
KEY = "synthetic00"


def unit(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)).astype(np.float32)


def noise(rng: np.random.Generator, count: int, scale: float) -> np.ndarray:
    """Gaussian noise of expected norm `scale` per row (a cluster member stays near its center)."""
    return scale * rng.normal(size=(count, DIMENSION)) / np.sqrt(DIMENSION)


def make_store(out: Path, rows: int, rng: np.random.Generator, layout: DatastoreConfig) -> dict:
    """Write a synthetic datastore: rows x (3 distinct cells + 1 label cell) and its index shards."""
    topics = unit(rng.normal(size=(2000, DIMENSION)))
    labels = unit(rng.normal(size=(20, DIMENSION)))
    label_ids = -(10**12) - np.arange(20, dtype=np.int64)  # a few values repeated across many rows
    datasets = [f"synthetic/d{i:04d}" for i in range(1000)]
    descriptions = unit(topics[rng.integers(0, 2000, 1000)] + noise(rng, 1000, 0.8))
    (out / "values" / KEY).mkdir(parents=True)
    (out / "cells" / KEY).mkdir(parents=True)
    (out / "rows" / KEY).mkdir(parents=True)
    chunk = 50_000
    next_value = 1
    for part, start in enumerate(range(0, rows, chunk)):
        count = min(chunk, rows - start)
        topic = rng.integers(0, 2000, count)
        vectors = unit(topics[np.repeat(topic, 3)] + noise(rng, count * 3, 0.8))
        ids = np.arange(next_value, next_value + count * 3, dtype=np.int64)
        ids[::2] *= -1  # value ids are signed in real stores too
        next_value += count * 3
        table = pa.table({"value_id": ids, "kind": ["cell"] * len(ids), "embedding": numpy_to_embeddings(vectors)})
        write_parquet_atomic(out / "values" / KEY / f"block-{part:05d}.parquet", table)
        row_uids = [f"{start + i:016x}" for i in range(count)]
        dataset_of_row = [datasets[(start + i) % 1000] for i in range(count)]
        label = label_ids[rng.integers(0, 20, count)]
        cell_values = np.column_stack([ids.reshape(count, 3), label]).reshape(-1)
        write_parquet_atomic(
            out / "cells" / KEY / f"part-{part:05d}.parquet",
            pa.Table.from_pydict(
                {
                    "cell_id": [f"{u}:{c}" for u in row_uids for c in range(4)],
                    "row_uid": np.repeat(row_uids, 4).tolist(),
                    "dataset_id": np.repeat(dataset_of_row, 4).tolist(),
                    "column": ["a", "b", "c", "label"] * count,
                    "value": [""] * (count * 4),
                    "value_id": cell_values,
                },
                schema=CELL_SCHEMA,
            ),
        )
        write_parquet_atomic(
            out / "rows" / KEY / f"part-{part:05d}.parquet",
            pa.Table.from_pydict(
                {
                    "row_uid": row_uids,
                    "dataset_id": dataset_of_row,
                    "config": ["default"] * count,
                    "split": ["train"] * count,
                    "row_number": list(range(start, start + count)),
                    "row": ["{}"] * count,
                },
                schema=ROW_SCHEMA,
            ),
        )
    label_table = pa.table({"value_id": label_ids, "kind": ["cell"] * 20, "embedding": numpy_to_embeddings(labels)})
    write_parquet_atomic(out / "values" / KEY / "block-99999.parquet", label_table)
    write_parquet_atomic(
        out / "datasets.parquet",
        pa.table(
            {
                "dataset_id": datasets,
                "config": ["default"] * 1000,
                "description_embedding": numpy_to_embeddings(descriptions),
                "source": [KEY] * 1000,
            }
        ),
    )
    entry = SourceEntry(
        spec="synthetic",
        kind="synthetic",
        fingerprint=KEY,
        key=KEY,
        state="ingested",
        datasets=1000,
        rows=rows,
        cells=rows * 4,
        new_values=rows * 3 + 20,
    )
    manifest = Manifest(
        embedder=Embedder(name="synthetic", dimension=DIMENSION),
        settings=Settings(rows_per_dataset=rows, max_value_chars=1000),
        sources=[entry],
    )
    write_manifest(out, manifest)
    # Shards as `rebase datastore build` groups them (consecutive blocks up to `shard_vectors`, kind by
    # `resolve_kind`), built in this process so the exact mode's memory is measured without Ray beside it.
    (out / "index").mkdir()
    blocks = sorted((out / "values" / KEY).glob("block-*.parquet"))
    for number, (group, vectors) in enumerate(group_blocks(blocks, layout.shard_vectors)):
        kind = resolve_kind(layout.index, vectors, layout.flat_max_vectors)
        path = str(out / "index" / f"{KEY}-{number:05d}.faiss")
        entry.shards.append(Shard(**build_shard([str(b) for b in group], path, kind, DIMENSION)))
    entry.state = "complete"
    write_manifest(out, manifest)
    return {"topics": topics, "descriptions": descriptions, "datasets": datasets, "labels": labels}


def compare_on_tasks(store: Path, settings: RetrieveConfig) -> dict:
    """Overlap@K and latency of the two modes on a real datastore, for each shipped task; also the
    overlap of the cell candidates alone (no description candidates), to show what they add."""
    from sentence_transformers import SentenceTransformer

    from rebase.datastore.manifest import read_manifest
    from rebase.models import resolve_model
    from rebase.retrieve import description_similarities
    from rebase.retrieve.score import task_query
    from rebase.task import load_task

    manifest = read_manifest(store)
    model = SentenceTransformer(str(resolve_model(manifest.embedder.name)))
    dimension = manifest.embedder.dimension
    results = {"shards": [s.model_dump() for e in manifest.sources for s in e.shards]}
    top_k, depth, dataset_rows = settings.top_k, settings.depth, settings.dataset_rows
    limit = settings.pool_factor * top_k
    with ApproximateIndex(store) as index:
        for path in sorted((Path(__file__).parent.parent / "jobs" / "tasks").glob("*.yaml")):
            task = load_task(path)
            query = task_query(task, lambda t: model.encode(t, normalize_embeddings=True, convert_to_numpy=True))
            description_by_id = apply_bans(description_similarities(store, query, dimension), task.ban)
            started = time.monotonic()
            exact = set(best_rows(exact_candidates(store, query, description_by_id, limit, dimension), top_k).row_uid)
            exact_seconds = time.monotonic() - started
            index.candidates(query, description_by_id, limit, depth, dataset_rows, top_k)  # warm
            started = time.monotonic()
            approximate = best_rows(
                index.candidates(query, description_by_id, limit, depth, dataset_rows, top_k), top_k
            )
            approximate_seconds = time.monotonic() - started
            rescored = index.rescored
            unbounded = best_rows(index.candidates(query, description_by_id, limit, depth, dataset_rows), top_k)
            cells_only = best_rows(index.candidates(query, description_by_id, limit, depth, 0, top_k), top_k)
            k = min(top_k, len(exact))
            results[task.name] = {
                "exact_seconds": round(exact_seconds, 3),
                "approximate_seconds": round(approximate_seconds, 3),
                "overlap_at_k": round(len(exact & set(approximate.row_uid)) / k, 4),
                "overlap_at_k_without_bound": round(len(exact & set(unbounded.row_uid)) / k, 4),
                "overlap_at_k_cells_only": round(len(exact & set(cells_only.row_uid)) / k, 4),
                "rows_rescored": rescored,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--top-k", type=int, help="as `rebase retrieve --top-k` (default: RetrieveConfig's)")
    parser.add_argument("--depth", type=int, help="as `rebase retrieve --depth` (default: RetrieveConfig's)")
    parser.add_argument(
        "--dataset-rows", type=int, help="as `rebase retrieve --dataset-rows` (default: RetrieveConfig's)"
    )
    parser.add_argument(
        "--tasks-store",
        type=Path,
        help="also compare the modes on a real (text) datastore for every shipped task in jobs/tasks",
    )
    parser.add_argument("--shard-vectors", type=int, help="as DatastoreConfig.shard_vectors (default: its default)")
    parser.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], help="as DatastoreConfig.index")
    args = parser.parse_args()
    flags = {name: value for name, value in vars(args).items() if value is not None}
    # Defaults live in the configs: the stage's settings and the store's shape as `rebase` would have them.
    settings = RetrieveConfig(
        datastore=Path("-"),
        task=Path("-"),
        out=Path("-"),
        **{k: flags[k] for k in RetrieveConfig.model_fields.keys() & flags},
    )
    layout = DatastoreConfig(
        sources=["synthetic"], out=Path("-"), **{k: flags[k] for k in DatastoreConfig.model_fields.keys() & flags}
    )
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("REBASE_BENCH_TMP")) as tmp:
        out = Path(tmp) / "store"
        started = time.monotonic()
        world = make_store(out, args.rows, rng, layout)
        build_seconds = time.monotonic() - started
        topics = world["topics"]
        examples_in = unit(topics[[11, 11, 11]] + noise(rng, 3, 0.5))
        examples_out = unit(np.stack([world["labels"][3]] * 3) + noise(rng, 3, 0.5))
        query = TaskQuery(input=examples_in.mean(0), output=examples_out.mean(0), instruction=unit(topics[11]))
        description_by_id = dict(zip(world["datasets"], (world["descriptions"] @ query.instruction).tolist()))
        limit = settings.pool_factor * settings.top_k

        def top(candidates):
            return set(best_rows(candidates, settings.top_k).row_uid)

        with PeakMemory() as exact_memory:
            started = time.monotonic()
            exact = top(exact_candidates(out, query, description_by_id, limit, DIMENSION))
            exact_seconds = time.monotonic() - started
        with PeakMemory() as approximate_memory:
            started = time.monotonic()
            with ApproximateIndex(out) as index:
                index.candidates(query, description_by_id, limit, 10)  # warm-up: actors loaded
                load_seconds = time.monotonic() - started
                timings = []
                for _ in range(5):
                    started = time.monotonic()
                    found = index.candidates(
                        query, description_by_id, limit, settings.depth, settings.dataset_rows, settings.top_k
                    )
                    approximate = top(found)
                    timings.append(time.monotonic() - started)
                rescored = index.rescored
        warm = float(np.median(timings))
        report = {
            "datastore": "synthetic vectors (not text), rebase on-disk layout, real FAISS shards",
            "rows": args.rows,
            "cells": args.rows * 4,
            "distinct_values": args.rows * 3 + 20,
            "shards": len(list((out / "index").glob("*.faiss"))),
            "index": layout.index,
            "shard_vectors": layout.shard_vectors,
            "store_write_seconds": round(build_seconds, 1),
            "top_k": settings.top_k,
            "depth": settings.depth,
            "dataset_rows": settings.dataset_rows,
            "exact_seconds": round(exact_seconds, 3),
            "approximate_warm_seconds_median_of_5": round(warm, 3),
            "approximate_load_seconds": round(load_seconds, 2),
            "speedup_warm": round(exact_seconds / warm, 1),
            "speedup_including_load": round(exact_seconds / (warm + load_seconds), 2),
            "overlap_at_k": round(len(exact & approximate) / settings.top_k, 4),
            "rows_rescored_per_query": rescored,
            "exact_peak_rss_mb": round(exact_memory.peak / 1e6),
            "approximate_peak_rss_mb": round(approximate_memory.peak / 1e6),
        }
    if args.tasks_store:
        report["tasks_store"] = compare_on_tasks(args.tasks_store, settings)
    print(json.dumps(report, indent=2))
    print(
        f"retrieval: approximate is {report['speedup_warm']}x faster than exact (warm), overlap@{settings.top_k} "
        f"{report['overlap_at_k']:.3f}"
    )


if __name__ == "__main__":
    main()
