"""The Python API (`rebase.build_datastore(...)`, `rebase.retrieve(...)`, ...): importable without Ray or
torch, keyword arguments validated as the stage's config fields, and a real build and retrieval through it."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

import rebase
from rebase import RebaseError

TASK = {
    "name": "planets",
    "instruction": "Answer questions about the planets and their order from the sun.",
    "examples": [
        {"input": "Which planet is number 3 from the sun?", "output": "planet 3"},
        {"input": "Which planet is number 5 from the sun?", "output": "planet 5"},
        {"input": "Which planet is number 8 from the sun?", "output": "planet 8"},
    ],
}

# Each call with its required fields, so the only thing wrong is what a test adds.
CALLS = {
    "build_datastore": (rebase.build_datastore, ("files:data.jsonl", "store")),
    "retrieve": (rebase.retrieve, ("store", "task.yaml", "retrieved")),
    "transform": (rebase.transform, ("retrieved", "task.yaml", "transformed")),
    "train": (rebase.train, ("transformed", "task.yaml", "student")),
    "evaluate": (rebase.evaluate, ("student", "task.yaml", "evaluation")),
    "serve": (rebase.serve, ("student",)),
}


def test_import_starts_neither_ray_nor_torch_and_stage_imports_keep_the_calls():
    script = (
        "import sys, rebase\n"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n"
        "import rebase.train, rebase.evaluate, rebase.retrieve\n"
        "from rebase.train import TrainSummary\n"
        "print(sorted(name for name in rebase.__all__ if callable(getattr(rebase, name))))\n"
        "print(rebase.train.__module__, rebase.retrieve.__module__, TrainSummary.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    calls, modules = result.stdout.splitlines()
    assert calls == str(sorted(rebase.__all__))
    # importing a stage module (which Python binds on the package) leaves the API call of that name in place
    assert modules == "rebase rebase rebase.train"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_an_unknown_keyword_is_named_before_the_stage_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call, required = CALLS[name]
    with pytest.raises(RebaseError, match=rf"^rebase\.{name}\(\): field 'nonsense': Extra inputs are not permitted$"):
        call(*required, nonsense=1)


def test_run_validates_pipeline_fields_from_keywords(tmp_path):
    with pytest.raises(RebaseError, match=r"^rebase\.run\(\): field 'nonsense'"):
        rebase.run(name="demo", task=tmp_path / "task.yaml", datastore={"path": "store"}, nonsense=1)
    with pytest.raises(RebaseError, match=r"^rebase\.run\(\): field 'name': String should match pattern"):
        rebase.run(name="bad name!", task=tmp_path / "task.yaml", datastore={"path": "store"})


def test_keyword_values_are_validated_as_config_fields(tmp_path):
    with pytest.raises(RebaseError, match=r"^rebase\.retrieve\(\): field 'top_k': Input should be greater than"):
        rebase.retrieve(tmp_path, tmp_path / "task.yaml", tmp_path / "out", top_k=0)
    with pytest.raises(RebaseError, match=r"^rebase\.retrieve\(\): field 'out': Field required$"):
        rebase.retrieve(tmp_path, tmp_path / "task.yaml")
    with pytest.raises(RebaseError, match=r"^rebase\.train\(\): field 'zero_stage'"):
        rebase.train(tmp_path, tmp_path / "task.yaml", tmp_path / "out", zero_stage=5)
    bad = tmp_path / "retrieve.yaml"
    bad.write_text(yaml.safe_dump({"datastore": "store", "task": "task.yaml", "out": "out", "depth": 0}))
    with pytest.raises(RebaseError, match=rf"^{bad}: field 'depth': Input should be greater than"):
        rebase.retrieve(config=bad)


def test_build_and_retrieve_through_the_api(tmp_path, source_files):
    store = tmp_path / "store"
    built = rebase.build_datastore(f"files:{source_files}/*", store, block_rows=50)
    assert built.out == store
    assert built.counts["datasets"] == 3
    assert built.counts["rows"] == 40 + 30 + 60
    assert built.counts["skipped_rows"] == 1  # the malformed JSONL line
    assert built.new_sources == 1

    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump(TASK))
    retrieved = rebase.retrieve(store, task, tmp_path / "retrieved", top_k=5)
    assert (retrieved.top_k, retrieved.rows, retrieved.mode) == (5, 5, "approximate")
    rows = pq.read_table(tmp_path / "retrieved" / "rows.parquet").to_pylist()
    assert [row["dataset_id"] for row in rows] == ["files/qa"] * 5  # the planet questions, nothing else
    assert retrieved.top_datasets == [("files/qa", 5)]

    # A config file as `--config`; the keyword arguments override its fields.
    settings = tmp_path / "retrieve.yaml"
    settings.write_text(
        yaml.safe_dump({"datastore": str(store), "task": str(task), "out": str(tmp_path / "exact"), "top_k": 50})
    )
    exact = rebase.retrieve(config=settings, top_k=3, exact=True)
    assert (exact.out, exact.top_k, exact.rows, exact.mode) == (tmp_path / "exact", 3, 3, "exact")
    exact_rows = pq.read_table(tmp_path / "exact" / "rows.parquet").to_pylist()
    assert [row["row_uid"] for row in exact_rows] == [row["row_uid"] for row in rows[:3]]
