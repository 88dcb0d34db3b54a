"""The datastore: public datasets flattened into cells, distinct values embedded, FAISS shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rebase.datastore.build import BuildSummary, build_datastore
from rebase.datastore.manifest import Manifest, check_complete, read_manifest
from rebase.io import iter_parquet

__all__ = ["BuildSummary", "Manifest", "build_datastore", "datastore_info", "read_manifest"]


def datastore_info(directory: Path) -> dict:
    """What a datastore holds: embedder, settings, counts, sources, shards, largest datasets, disk size."""
    manifest = read_manifest(directory)
    check_complete(directory, manifest)
    per_dataset: Counter[str] = Counter()
    if (directory / "datasets.parquet").exists():
        for batch in iter_parquet([directory / "datasets.parquet"], columns=["dataset_id", "rows"]):
            per_dataset.update(dict(zip(batch.column("dataset_id").to_pylist(), batch.column("rows").to_pylist())))
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return {
        "path": str(directory),
        "embedder": manifest.embedder.model_dump(),
        "settings": manifest.settings.model_dump(),
        "index": manifest.index,
        "counts": manifest.counts(),
        "sources": [
            {
                "spec": s.spec,
                "state": s.state,
                "datasets": s.datasets,
                "rows": s.rows,
                "cells": s.cells,
                "new_values": s.new_values,
                "skipped_rows": s.skipped_rows,
                "shards": [sh.model_dump() for sh in s.shards],
            }
            for s in manifest.sources
        ],
        "largest_datasets": per_dataset.most_common(10),
        "bytes_on_disk": size,
        "created": manifest.created,
        "updated": manifest.updated,
    }
