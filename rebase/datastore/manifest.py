"""The datastore's `manifest.json`: what it was built with, what it holds, and each ingested source."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from rebase.errors import RebaseError
from rebase.io import write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class Embedder(BaseModel):
    name: str
    dimension: int
    normalized: bool = True


class Settings(BaseModel):
    """Choices that change what a row becomes; a datastore keeps them for every later source."""

    rows_per_dataset: int
    max_value_chars: int
    embed_max_tokens: int | None = None


class Shard(BaseModel):
    file: str
    kind: Literal["flat", "ivf", "hnsw"]
    vectors: int
    nlist: int | None = None


class SourceEntry(BaseModel):
    spec: str
    kind: str
    fingerprint: str
    key: str
    state: Literal["ingesting", "ingested", "complete"] = "ingesting"
    datasets: int = 0
    rows: int = 0
    cells: int = 0
    new_values: int = 0
    skipped_rows: int = 0
    value_blocks: int = 0
    shards: list[Shard] = Field(default_factory=list)


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    embedder: Embedder
    settings: Settings
    index: str = "auto"
    sources: list[SourceEntry] = Field(default_factory=list)
    created: str = Field(default_factory=lambda: _now())
    updated: str = Field(default_factory=lambda: _now())

    def counts(self) -> dict[str, int]:
        done = [s for s in self.sources if s.state == "complete"]
        return {
            "sources": len(done),
            "datasets": sum(s.datasets for s in done),
            "rows": sum(s.rows for s in done),
            "cells": sum(s.cells for s in done),
            "distinct_values": sum(s.new_values for s in done),
            "skipped_rows": sum(s.skipped_rows for s in done),
            "shards": sum(len(s.shards) for s in done),
            "vectors": sum(sh.vectors for s in done for sh in s.shards),
        }

    def source(self, fingerprint: str) -> SourceEntry | None:
        return next((s for s in self.sources if s.fingerprint == fingerprint), None)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a datastore directory; one clear error if it is not a datastore."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise RebaseError(f"{directory}: no such datastore directory")
    if not path.is_file():
        raise RebaseError(f"{directory} is not a rebase datastore (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise RebaseError(f"{path} is damaged or not a rebase manifest") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version != FORMAT_VERSION:
        raise RebaseError(f"{directory} has datastore format {version}; this rebase reads {FORMAT_VERSION}")
    try:
        return Manifest.model_validate(data)
    except ValidationError:
        raise RebaseError(f"{path} is damaged or not a rebase manifest") from None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.updated = _now()
    write_json_atomic(directory / MANIFEST, manifest.model_dump(mode="json"))


def missing_parts(directory: Path, manifest: Manifest) -> list[str]:
    """The data a finished source of the manifest needs that the directory lacks: its rows, cells and
    values folders, its index shards and the datasets table (a manifest alone is no datastore)."""
    missing = []
    done = [source for source in manifest.sources if source.state == "complete"]
    if done and not (directory / "datasets.parquet").is_file():
        missing.append("datasets.parquet")
    for source in done:
        for folder in ("rows", "cells", "values"):
            if not any((directory / folder / source.key).glob("*.parquet")):
                missing.append(f"{folder}/{source.key}")
        missing += [
            f"index/{shard.file}" for shard in source.shards if not (directory / "index" / shard.file).is_file()
        ]
    return missing


def check_complete(directory: Path, manifest: Manifest) -> None:
    """One clear error when the datastore's data is not all there (see `missing_parts`)."""
    missing = missing_parts(directory, manifest)
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise RebaseError(
            f"{directory} is damaged: its manifest lists {manifest.counts()['rows']:,} rows but "
            f"{listed} {'is' if len(missing) == 1 else 'are'} missing; rebuild it with rebase datastore build "
            "into a new directory"
        )
