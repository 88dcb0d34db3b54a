"""The retrieve stage (rebase/retrieve/__init__.py) over a real datastore (real Ray build, real MiniLM):
planted rows come first, bans hold, both modes agree, finished retrievals are recognised."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from rebase.config import DatastoreConfig, RetrieveConfig
from rebase.datastore import build_datastore
from rebase.errors import RebaseError
from rebase.retrieve import RetrieveSummary, retrieve, retrieve_stage
from rebase.task import Example, TaskSpec

TASK = TaskSpec(
    name="capitals",
    instruction="Answer questions about the capital cities of countries.",
    examples=[
        Example(input="What is the capital of France?", output="Paris"),
        Example(input="What is the capital of Japan?", output="Tokyo"),
        Example(input="What is the capital of Kenya?", output="Nairobi"),
    ],
    ban=["files/banned_capitals"],
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    data = root / "data"
    data.mkdir()
    capitals = [
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Egypt", "Cairo"),
        ("Peru", "Lima"),
        ("Canada", "Ottawa"),
        ("Norway", "Oslo"),
    ]
    planted = [{"question": f"Which city is the capital of {c}?", "answer": a} for c, a in capitals]
    planted.append(dict(planted[0]))  # an exact duplicate row, to be collapsed
    (data / "geo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted))
    (data / "geo.jsonl.description.txt").write_text("Questions about the capital cities of countries.")
    (data / "banned_capitals.jsonl").write_text(
        "".join(json.dumps({"question": f"What is the capital of {c}?", "answer": a}) + "\n" for c, a in capitals)
    )
    unrelated = [
        {"recipe": f"Whisk {i} eggs with sugar and bake for {20 + i} minutes.", "rating": str(i % 5)} for i in range(40)
    ]
    (data / "baking.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unrelated))
    (data / "baking.jsonl.description.txt").write_text("Baking recipes with ratings.")
    sport = [
        {"sentence": f"The striker scored {i} goals in the league this season.", "label": "plausible"}
        for i in range(40)
    ]
    (data / "sport.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sport))
    (data / "sport.jsonl.description.txt").write_text("Sports sentences labelled for plausibility.")
    grid = [  # close to the task in words, but lists of coordinates: the kind navigate retrieved by the hundred
        {"question": f"Capital grid of Italy: ({i}, -{i + 3}), ({i + 5}, {i}), ({2 * i}, 7)", "answer": "Rome"}
        for i in range(6)
    ]
    (data / "capital_grid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grid))
    (data / "capital_grid.jsonl.description.txt").write_text("Grid coordinates of capital cities.")
    out = root / "store"
    build_datastore(DatastoreConfig(sources=[f"files:{data}"], out=out))
    (root / "task.yaml").write_text(yaml.safe_dump(TASK.model_dump(mode="json", exclude_defaults=True)))
    return root, out


def run(root, out, target, **fields) -> RetrieveSummary:
    """`rebase retrieve` with these RetrieveConfig fields, the task read from its file."""
    return retrieve_stage(RetrieveConfig(datastore=out, task=root / "task.yaml", out=root / target, **fields))


def test_planted_rows_come_first_and_bans_hold(store):
    root, out = store
    summary = run(root, out, "got", top_k=10)
    table = pq.read_table(root / "got" / "rows.parquet").to_pylist()
    assert summary.rows == len(table) == 10
    assert [r["rank"] for r in table] == list(range(1, 11))
    assert all(r["dataset_id"] != "files/banned_capitals" for r in table)  # closest rows, but banned
    assert [r["dataset_id"] for r in table[:6]] == ["files/geo"] * 6  # the six distinct planted rows first
    assert len({r["row"] for r in table[:6]}) == 6  # the duplicate was collapsed
    scores = [r["score"] for r in table]
    assert scores == sorted(scores, reverse=True)
    for r in table:
        assert r["score"] == pytest.approx(
            (r["input_score"] + r["output_score"] + r["description_score"]) / 3, abs=1e-5
        )
    stats = json.loads((root / "got" / "stats.json").read_text())
    assert stats["rows"] == 10 and (root / "got" / "_SUCCESS").exists()


def test_per_dataset_cap_and_bad_requests(store):
    root, out = store
    run(root, out, "capped", top_k=6, per_dataset_cap=2)
    table = pq.read_table(root / "capped" / "rows.parquet").to_pylist()
    counts = {}
    for r in table:
        counts[r["dataset_id"]] = counts.get(r["dataset_id"], 0) + 1
    assert max(counts.values()) <= 2 and counts["files/geo"] == 2 and len(table) == 6
    with pytest.raises(RebaseError, match="larger than the datastore"):
        run(root, out, "x", top_k=10_000)
    with pytest.raises(RebaseError, match="built with embedder"):
        run(root, out, "x", top_k=5, embedder="builtin:gemma3-270m")


@pytest.mark.parametrize("exact", [True, False])
def test_rows_of_another_kind_than_the_task_inputs_are_left_out(store, exact):
    """The capital questions are words; the coordinate rows about capitals rank among the top 10 only when
    `match_kind` is off."""
    root, out = store
    before = run(root, out, f"all-kinds-{exact}", top_k=10, exact=exact, match_kind=False)
    after = run(root, out, f"words-{exact}", top_k=10, exact=exact)
    ids = {name: [r["dataset_id"] for r in pq.read_table(root / name / "rows.parquet").to_pylist()]
           for name in (f"all-kinds-{exact}", f"words-{exact}")}  # fmt: skip
    assert "files/capital_grid" in ids[f"all-kinds-{exact}"]
    assert "files/capital_grid" not in ids[f"words-{exact}"] and len(ids[f"words-{exact}"]) == 10
    stats = json.loads((root / f"words-{exact}" / "stats.json").read_text())
    assert stats["kinds"] == ["words"] and stats["off_kind"] >= 6 and stats["match_kind"] is True
    assert before.rows == after.rows == 10


def test_exact_and_approximate_modes_agree(store):
    root, out = store
    for kind in ("exact", "approximate"):
        run(root, out, kind, top_k=20, exact=kind == "exact", depth=1000)  # depth: every value
    exact = pq.read_table(root / "exact" / "rows.parquet").to_pylist()
    approximate = pq.read_table(root / "approximate" / "rows.parquet").to_pylist()
    assert [r["row_uid"] for r in approximate] == [r["row_uid"] for r in exact]
    for a, e in zip(approximate, exact):
        assert a["score"] == pytest.approx(e["score"], abs=1e-5)
    assert json.loads((root / "approximate" / "stats.json").read_text())["mode"] == "approximate"


def test_rerun_is_skipped_and_other_results_are_never_overwritten(store):
    root, out = store
    first = run(root, out, "again", top_k=5, exact=True)
    stamp = (root / "again" / "rows.parquet").stat().st_mtime_ns
    # The Python entry with the task already loaded: the same inputs, so the same finished retrieval.
    second = retrieve(
        RetrieveConfig(datastore=out, task=root / "task.yaml", out=root / "again", top_k=5, exact=True), TASK
    )
    assert second.mode == "exact, already done" and second.rows == first.rows == 5
    assert second.top_datasets == first.top_datasets and second.score_range == pytest.approx(first.score_range)
    assert (root / "again" / "rows.parquet").stat().st_mtime_ns == stamp
    with pytest.raises(RebaseError, match="made from other inputs or settings"):
        run(root, out, "again", top_k=6, exact=True)
    with pytest.raises(RebaseError, match="made from other inputs or settings"):
        run(root, out, "again", top_k=5, exact=True, pool_factor=5)
    (root / "unrelated").mkdir()
    (root / "unrelated" / "notes.txt").write_text("mine")
    with pytest.raises(RebaseError, match="not a rebase retrieval"):
        run(root, out, "unrelated", top_k=5, exact=True)
    assert (root / "unrelated" / "notes.txt").read_text() == "mine"


def test_approximate_mode_finds_rows_led_by_their_datasets_description(store):
    """A third of the score is the dataset description's: with a candidate depth of one value per query
    the cell search alone cannot reach the planted rows; the rows of the best-described datasets can."""
    root, out = store
    run(root, out, "exact6", top_k=6, exact=True)
    exact = [r["row_uid"] for r in pq.read_table(root / "exact6" / "rows.parquet").to_pylist()]
    run(root, out, "cells-only", top_k=6, depth=1, dataset_rows=0)
    cells_only = [r["row_uid"] for r in pq.read_table(root / "cells-only" / "rows.parquet").to_pylist()]
    assert len(set(cells_only) & set(exact)) < 6  # what the description candidates are for
    summary = run(root, out, "with-datasets", top_k=6, depth=1)  # default: 2 x top_k rows
    table = pq.read_table(root / "with-datasets" / "rows.parquet").to_pylist()
    assert [r["row_uid"] for r in table] == exact and summary.rows == 6
    assert json.loads((root / "with-datasets" / "stats.json").read_text())["dataset_rows"] == 12


def test_score_bound_drops_only_rows_that_cannot_be_selected(store):
    """With an exact (flat) shard the search's last score bounds every value it did not return, so rows
    that cannot make the top K are dropped before re-scoring: the same rows must come out as when every
    candidate is re-scored."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from rebase.datastore.manifest import read_manifest
    from rebase.models import resolve_model
    from rebase.retrieve import description_similarities
    from rebase.retrieve.score import apply_bans, best_rows, task_query
    from rebase.retrieve.shards import ApproximateIndex

    _, out = store
    manifest = read_manifest(out)
    model = SentenceTransformer(str(resolve_model(manifest.embedder.name)))
    query = task_query(TASK, lambda t: model.encode(t, normalize_embeddings=True, convert_to_numpy=True))
    description = apply_bans(description_similarities(out, query, manifest.embedder.dimension), TASK.ban)
    with ApproximateIndex(out) as index:
        assert index.exact
        pruned = 0
        for depth in (2, 4, 8, 16, 1000):  # 1000: every value found, the bound is each row's exact score
            for keep in (3, 10, 20, 40, 60):
                every = best_rows(index.candidates(query, description, 100, depth, 60), keep)
                every_count = index.rescored
                bounded = best_rows(index.candidates(query, description, 100, depth, 60, keep), keep)
                pruned += every_count - index.rescored
                assert list(bounded.row_uid) == list(every.row_uid), (depth, keep)
                np.testing.assert_allclose(bounded.score, every.score, atol=1e-6)
                assert "files/banned_capitals" not in set(every.dataset_id)
        assert pruned > 0
