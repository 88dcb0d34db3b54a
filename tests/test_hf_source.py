"""`hf:` sources through the same file readers as `files:`.

The Hugging Face Hub cannot be reached from CI, so FakeHub stands in for `HfFileSystem` at that one
boundary: a local folder laid out like the Hub's parquet export (`refs/convert/parquet`). Everything
after the listing (parquet reading, class labels, flattening, embedding, indexing) is the real code.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from rebase.config import DatastoreConfig
from rebase.datastore import build_datastore
from rebase.datastore import sources as sources_module


class FakeHub(DirFileSystem):
    """A local folder answering the two HfFileSystem calls the hf: source makes (glob, resolve_path)."""

    def resolve_path(self, path):
        return SimpleNamespace(revision="fake-revision-1")


def _write_split(root, config, split, rows):
    features = {
        "text": {"dtype": "string", "_type": "Value"},
        "label": {"names": ["negative", "positive"], "_type": "ClassLabel"},
    }
    table = pa.table({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    folder = root / "datasets" / "acme" / "reviews@refs%2Fconvert%2Fparquet" / config / split
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "0000.parquet")


def test_hf_source_reads_the_parquet_export_per_config(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    _write_split(hub, "default", "train", [(f"great product {i}", 1) for i in range(12)])
    _write_split(hub, "default", "test", [(f"broke after a day {i}", 0) for i in range(5)])
    _write_split(hub, "short", "train", [("fine", 1), ("bad", 0)])
    monkeypatch.setattr(sources_module, "hub_filesystem", lambda: FakeHub(path=str(hub), fs=LocalFileSystem()))
    monkeypatch.setattr(sources_module, "_hf_description", lambda dataset: f"Product reviews ({dataset})")

    source = sources_module.open_source("hf:acme/reviews")
    datasets = list(source.datasets())
    assert [(d.dataset_id, d.config, d.count()) for d in datasets] == [
        ("hf/acme/reviews", "default", [5, 12]),  # splits in name order: test, train
        ("hf/acme/reviews", "short", [2]),
    ]
    only_short = sources_module.open_source("hf:acme/reviews:short")
    assert [d.config for d in only_short.datasets()] == ["short"]
    assert only_short.fingerprint != source.fingerprint

    out = tmp_path / "store"
    summary = build_datastore(DatastoreConfig(sources=["hf:acme/reviews"], out=out, rows_per_dataset=10))
    assert summary.counts["datasets"] == 2
    assert summary.counts["rows"] == 10 + 2  # the 17-row config is capped at 10, sampled evenly
    rows = pq.read_table(sorted((out / "rows").rglob("*.parquet"))).to_pylist()
    default = [r for r in rows if r["config"] == "default"]
    assert [r["split"] for r in default].count("test") == 3  # even sample over test (5) then train (12)
    assert json.loads(default[0]["row"]) == {"text": "broke after a day 0", "label": "negative"}
    datasets = pq.read_table(out / "datasets.parquet").to_pylist()
    assert {d["description"] for d in datasets} == {"Product reviews (acme/reviews)"}
