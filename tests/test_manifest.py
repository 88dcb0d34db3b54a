"""The datastore manifest (rebase/datastore/manifest.py): round-trip, counts and clear errors."""

from __future__ import annotations

import json

import pytest

from rebase.datastore.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    Embedder,
    Manifest,
    Settings,
    Shard,
    SourceEntry,
    read_manifest,
    write_manifest,
)
from rebase.errors import RebaseError


def entry(spec: str, state: str, rows: int, shards: list[Shard] | None = None) -> SourceEntry:
    return SourceEntry(
        spec=spec,
        kind="files",
        fingerprint=f"fp-{spec}",
        key=f"key-{spec}",
        state=state,
        datasets=2,
        rows=rows,
        cells=rows * 3,
        new_values=rows * 2,
        skipped_rows=1,
        value_blocks=1,
        shards=shards or [],
    )


def sample_manifest() -> Manifest:
    return Manifest(
        embedder=Embedder(name="builtin:minilm", dimension=384),
        settings=Settings(rows_per_dataset=1000, max_value_chars=1000),
        index="flat",
        sources=[
            entry("files:a", "complete", 10, [Shard(file="shards/0.faiss", kind="flat", vectors=20)]),
            entry(
                "files:b",
                "complete",
                5,
                [
                    Shard(file="shards/1.faiss", kind="flat", vectors=7),
                    Shard(file="shards/2.faiss", kind="ivf", vectors=3, nlist=4),
                ],
            ),
            entry("files:c", "ingested", 100, [Shard(file="shards/3.faiss", kind="flat", vectors=200)]),
            entry("files:d", "ingesting", 1000),
        ],
    )


def test_write_then_read_gives_the_same_manifest(tmp_path):
    manifest = sample_manifest()
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]  # no temp file left behind


def test_manifest_on_disk_is_plain_json(tmp_path):
    write_manifest(tmp_path, sample_manifest())
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["format_version"] == FORMAT_VERSION == 1
    assert data["embedder"] == {"name": "builtin:minilm", "dimension": 384, "normalized": True}
    assert data["settings"] == {"rows_per_dataset": 1000, "max_value_chars": 1000, "embed_max_tokens": None}
    assert [s["state"] for s in data["sources"]] == ["complete", "complete", "ingested", "ingesting"]
    assert data["sources"][1]["shards"][1] == {"file": "shards/2.faiss", "kind": "ivf", "vectors": 3, "nlist": 4}


def test_write_manifest_sets_updated_and_keeps_created(tmp_path):
    manifest = sample_manifest()
    manifest.created = "2000-01-01T00:00:00+00:00"
    manifest.updated = "2000-01-01T00:00:00+00:00"
    write_manifest(tmp_path, manifest)
    read = read_manifest(tmp_path)
    assert read.created == "2000-01-01T00:00:00+00:00"
    assert read.updated > "2000-01-01T00:00:00+00:00"
    assert read.updated.endswith("+00:00")


def test_counts_only_count_complete_sources():
    # Complete: a (10 rows, 1 shard of 20) and b (5 rows, shards of 7 and 3); c and d are unfinished.
    assert sample_manifest().counts() == {
        "sources": 2,
        "datasets": 4,
        "rows": 15,
        "cells": 45,
        "distinct_values": 30,
        "skipped_rows": 2,
        "shards": 3,
        "vectors": 30,
    }


def test_counts_of_an_empty_manifest_are_zero():
    manifest = Manifest(
        embedder=Embedder(name="m", dimension=8), settings=Settings(rows_per_dataset=1, max_value_chars=16)
    )
    assert set(manifest.counts().values()) == {0}


def test_source_finds_an_entry_by_fingerprint():
    manifest = sample_manifest()
    assert manifest.source("fp-files:c").spec == "files:c"
    assert manifest.source("no such fingerprint") is None


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RebaseError) as error:
        read_manifest(missing)
    assert str(error.value) == f"{missing}: no such datastore directory"


def test_directory_without_manifest_is_not_a_datastore(tmp_path):
    with pytest.raises(RebaseError) as error:
        read_manifest(tmp_path)
    assert str(error.value) == f"{tmp_path} is not a rebase datastore (no manifest.json)"


@pytest.mark.parametrize(
    "text",
    ['{"format_version": 1, "embedder": {"name": "m", "dimension": 8}', "[]", '{"format_version": 1}', "\x00\x01"],
    ids=["truncated", "list", "missing-fields", "binary"],
)
def test_damaged_manifest_is_a_clear_error(tmp_path, text):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(RebaseError) as error:
        read_manifest(tmp_path)
    assert str(error.value) == f"{tmp_path / MANIFEST} is damaged or not a rebase manifest"


def test_manifest_that_is_not_utf8_is_damaged(tmp_path):
    (tmp_path / MANIFEST).write_bytes(b'{"format_version": "\xff"}')
    with pytest.raises(RebaseError, match="is damaged or not a rebase manifest"):
        read_manifest(tmp_path)


def test_wrong_format_version_names_both_versions(tmp_path):
    data = sample_manifest().model_dump(mode="json")
    data["format_version"] = 2
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(RebaseError) as error:
        read_manifest(tmp_path)
    assert str(error.value) == f"{tmp_path} has datastore format 2; this rebase reads 1"


def test_newer_format_with_other_fields_names_the_format(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 2, "embedders": [], "sources": {}}))
    with pytest.raises(RebaseError) as error:
        read_manifest(tmp_path)
    assert str(error.value) == f"{tmp_path} has datastore format 2; this rebase reads 1"
