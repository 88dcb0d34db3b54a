"""Integration: real Ray, real MiniLM, real FAISS; datastores built from generated files and BIG-bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from processes import kill_when

from rebase.config import DatastoreConfig
from rebase.datastore import build_datastore, datastore_info, read_manifest
from rebase.datastore.flatten import flatten_row, value_id
from rebase.datastore.index import load_shard, search_shards
from rebase.io import embeddings_to_numpy


def _config(out, sources, **fields):
    return DatastoreConfig(sources=sources, out=out, **fields)


def _table(out: Path, part: str):
    return pq.read_table(sorted((out / part).rglob("*.parquet")))


def _value_vectors(out: Path) -> dict[int, np.ndarray]:
    vectors = {}
    for path in sorted((out / "values").rglob("block-*.parquet")):
        table = pq.read_table(path)
        for vid, vector in zip(
            table.column("value_id").to_pylist(), embeddings_to_numpy(table.column("embedding"), 384)
        ):
            vectors[vid] = vector
    return vectors


def _shards(out: Path) -> list[Path]:
    return sorted((out / "index").glob("*.faiss"))


def test_build_from_files_counts_cells_and_search(tmp_path, source_files):
    out = tmp_path / "store"
    summary = build_datastore(
        _config(out, [f"files:{source_files}/*"], rows_per_dataset=50, block_rows=50, shard_vectors=120)
    )

    # Expected content, computed from the inputs the way the paper flattens them.
    qa = [json.loads(line) for line in (source_files / "qa.jsonl").read_text().splitlines()[:40]]
    nli = pq.read_table(source_files / "nli.parquet").to_pylist()
    picked_nli = [nli[(i * 60) // 50] for i in range(50)]  # 60 rows capped evenly to 50
    labels = {"label": ["entailment", "neutral", "contradiction"]}
    reviews = [
        {"review": f"The film number {i} was {'great' if i % 2 else 'dull'}", "stars": str(i % 5)} for i in range(30)
    ]
    flat = [flatten_row(r, 1000) for r in qa + reviews] + [flatten_row(r, 1000, labels) for r in picked_nli]
    values = {text for row in flat for text in row.values()}

    assert summary.counts["datasets"] == 3
    assert summary.counts["rows"] == 40 + 30 + 50
    assert summary.counts["cells"] == sum(len(r) for r in flat) == 40 * 3 + 30 * 2 + 50 * 3
    assert summary.counts["distinct_values"] == len(values)
    assert summary.counts["skipped_rows"] == 1  # the malformed JSONL line, skipped and counted
    assert summary.embedded == len(values) + 3  # each distinct value once, plus three descriptions

    cells = _table(out, "cells")
    assert cells.num_rows == summary.counts["cells"]
    assert set(cells.column("value").to_pylist()) == values
    assert {"entailment", "neutral", "contradiction"} <= values  # class-label ids became names
    assert "meta.level" in set(cells.column("column").to_pylist())  # nested keys joined with '.'
    rows = _table(out, "rows")
    assert len(set(rows.column("row_uid").to_pylist())) == rows.num_rows == 120

    datasets = pq.read_table(out / "datasets.parquet").to_pylist()
    by_id = {d["dataset_id"]: d for d in datasets}
    assert by_id["files/qa"]["description"] == "Questions about planets and their order from the sun."
    assert by_id["files/nli"]["rows"] == 50 and by_id["files/qa"]["skipped_rows"] == 1
    assert all(abs(np.linalg.norm(d["description_embedding"]) - 1) < 1e-4 for d in datasets)

    # Several shards (shard_vectors=120); a cell's own vector finds that cell's value first.
    shards = _shards(out)
    sizes = [load_shard(s).ntotal for s in shards]
    assert len(shards) >= 2 and max(sizes) <= 120 and sum(sizes) == len(values)
    vectors = _value_vectors(out)
    probe = [r for r in cells.to_pylist() if r["value"].startswith("Which planet is number 17")][0]
    scores, ids = search_shards(shards, vectors[probe["value_id"]][None, :], k=3)
    assert ids[0, 0] == probe["value_id"] == value_id(probe["value"])
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-4)

    # The stored vector is the model's embedding of the text.
    from sentence_transformers import SentenceTransformer

    from rebase.models import resolve_model

    model = SentenceTransformer(str(resolve_model("builtin:minilm")), device="cpu")
    fresh = model.encode([probe["value"]], normalize_embeddings=True)
    assert float(fresh[0] @ vectors[probe["value_id"]]) == pytest.approx(1.0, abs=1e-3)
    scores, ids = search_shards(shards, fresh, k=1)
    assert ids[0, 0] == probe["value_id"]


def test_rebuild_does_no_work_and_new_source_embeds_only_new_values(tmp_path, source_files):
    out = tmp_path / "store"
    first = build_datastore(_config(out, [f"files:{source_files}/qa.jsonl"]))
    assert first.new_sources == 1
    files_before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    again = build_datastore(_config(out, [f"files:{source_files}/qa.jsonl"]))
    assert (again.new_sources, again.new_rows, again.embedded) == (0, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files_before

    # A second source sharing some values with the first: only its unseen values are embedded.
    (source_files / "more.jsonl").write_text(
        "\n".join(
            json.dumps({"question": q, "answer": a})
            for q, a in [
                ("Which planet is number 3 from the sun?", "planet 3"),  # both values already stored
                ("Which moon orbits Mars?", "Phobos"),
            ]
        )
        + "\n"
    )
    added = build_datastore(_config(out, [f"files:{source_files}/qa.jsonl", f"files:{source_files}/more.jsonl"]))
    assert added.new_sources == 1 and added.new_rows == 2
    assert added.embedded == 2 + 1  # "Which moon orbits Mars?", "Phobos", and the new description
    manifest = read_manifest(out)
    assert [s.state for s in manifest.sources] == ["complete", "complete"]
    assert manifest.counts()["rows"] == 42
    assert datastore_info(out)["counts"]["distinct_values"] == first.counts["distinct_values"] + 2


def test_index_kinds_find_a_cells_own_vector(tmp_path, source_files):
    for kind in ("hnsw", "ivf"):
        out = tmp_path / kind
        build_datastore(_config(out, [f"files:{source_files}/nli.parquet"], index=kind))
        shard = read_manifest(out).sources[0].shards[0]
        assert shard.kind == kind
        vectors = _value_vectors(out)
        ids = np.array(list(vectors))
        matrix = np.stack([vectors[i] for i in ids])
        _, found = search_shards(_shards(out), matrix, k=1)
        # Approximate indexes, but a stored vector must find itself (recall@1 on the store's own vectors).
        assert (found[:, 0] == ids).mean() >= 0.95


def _build_command(out: Path, *sources: str, extra=()) -> list[str]:
    command = [sys.executable, "-m", "rebase", "datastore", "build", "--out", str(out)]
    for source in sources:
        command += ["--source", source]
    return command + list(extra)


def test_interrupted_build_resumes_without_reembedding_finished_blocks(tmp_path, rebase_env):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"sentence number {i} about topic {i % 17}", "id": f"item-{i}"} for i in range(1000)]
    (data / "big.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "store"
    command = _build_command(
        out, f"files:{data}/big.jsonl", extra=["--block-rows", "100", "--rows-per-dataset", "1000"]
    )
    values_dir = out / "values"
    kill_when(command, lambda: len(list(values_dir.rglob("block-*.parquet"))) >= 5, "build", env=rebase_env)
    finished_blocks = {p.name: p.stat().st_mtime_ns for p in values_dir.rglob("block-*.parquet")}
    assert 5 <= len(finished_blocks) < 20

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=rebase_env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    distinct = 1000 * 2 + 1  # every text and id is distinct, plus one description
    embedded_now = int(summary.split("embedded ")[1].split(" ")[0].replace(",", ""))
    assert embedded_now == distinct - 100 * len(finished_blocks)
    # Blocks finished before the kill were kept as they were, not embedded again.
    for path in values_dir.rglob("block-*.parquet"):
        if path.name in finished_blocks:
            assert path.stat().st_mtime_ns == finished_blocks[path.name]
    manifest = read_manifest(out)
    assert manifest.counts()["rows"] == 1000 and manifest.counts()["distinct_values"] == 2000
    assert sum(load_shard(s).ntotal for s in _shards(out)) == 2000
    assert not (out / "staging").exists()


@pytest.mark.slow
def test_build_from_bigbench_tasks(tmp_path):
    from rebase.datastore.sources import bigbench_archive, bigbench_row

    out = tmp_path / "bb"
    summary = build_datastore(_config(out, ["bigbench:navigate,logical_deduction"], rows_per_dataset=60))
    import tarfile

    expected = {}
    with tarfile.open(bigbench_archive()) as tar:
        for name in (
            "navigate",
            "logical_deduction/three_objects",
            "logical_deduction/five_objects",
            "logical_deduction/seven_objects",
        ):
            task = json.load(tar.extractfile(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"))
            expected[f"bigbench/{name}"] = task
    assert summary.counts["datasets"] == 4
    datasets = {d["dataset_id"]: d for d in pq.read_table(out / "datasets.parquet").to_pylist()}
    assert set(datasets) == set(expected)
    for dataset_id, task in expected.items():
        assert datasets[dataset_id]["rows"] == min(60, len(task["examples"]))
        assert datasets[dataset_id]["description"] == task["description"].strip()
    rows = _table(out, "rows").to_pylist()
    navigate = [r for r in rows if r["dataset_id"] == "bigbench/navigate"]
    first = json.loads(navigate[0]["row"])
    example = expected["bigbench/navigate"]["examples"][0]
    assert first["input"] == example["input"].strip()[:1000]
    assert first["output"] == bigbench_row(example)["output"]
    assert summary.counts["rows"] == sum(min(60, len(t["examples"])) for t in expected.values())


def test_values_waiting_from_an_earlier_build_are_finished_and_orphans_swept(tmp_path, source_files):
    from rebase.errors import RebaseError

    (source_files / "bad.jsonl").write_text("{oops\n")
    out = tmp_path / "store"
    # qa is ingested, then the bad file stops the build before anything is embedded.
    with pytest.raises(RebaseError, match="no readable rows"):
        build_datastore(_config(out, [f"files:{source_files}/qa.jsonl", f"files:{source_files}/bad.jsonl"]))
    assert [s.state for s in read_manifest(out).sources] == ["ingested"]
    orphan = out / "rows" / "0123456789ab"
    orphan.mkdir(parents=True)
    (orphan / "part-00000.parquet").write_bytes(b"left by a killed ingestion")

    # A later build names only another source that shares values with qa; qa is finished as well,
    # so every cell of the store has its vector.
    (source_files / "more.jsonl").write_text(json.dumps({"question": "Which planet is number 3 from the sun?"}) + "\n")
    summary = build_datastore(_config(out, [f"files:{source_files}/more.jsonl"]))
    assert [s.state for s in read_manifest(out).sources] == ["complete", "complete"]
    assert summary.counts["rows"] == 41
    cells = _table(out, "cells")
    assert set(cells.column("value_id").to_pylist()) <= set(_value_vectors(out))
    assert not orphan.exists()
