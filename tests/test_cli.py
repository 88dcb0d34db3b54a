"""The `rebase` command as a user runs it: one clear line and exit 2 on bad input, data kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rebase.datastore import read_manifest
from rebase.datastore.manifest import MANIFEST


@pytest.fixture(autouse=True)
def _join_the_session_ray(ray_address, monkeypatch):
    """`rebase` subprocesses join the session's Ray instead of starting one each."""
    monkeypatch.setenv("RAY_ADDRESS", ray_address)


def rebase(*args, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-m", "rebase", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rebase: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def built_store(tmp_path_factory, rebase_env):
    """A small real datastore built once through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(20))
    )
    out = root / "store"
    result = rebase(
        "datastore",
        "build",
        "--source",
        f"files:{root}/a.jsonl",
        "--out",
        str(out),
        "--description",
        "Q&A",
        env=rebase_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"datastore {out}: 1 datasets, 20 rows, 40 cells, 40 distinct values")
    return root, out


def test_info_describes_the_store(built_store):
    _, out = built_store
    result = rebase("datastore", "info", str(out))
    assert result.returncode == 0
    assert "builtin:minilm  dim=384" in result.stdout
    assert "1 datasets, 20 rows, 40 cells, 40 distinct values" in result.stdout
    info = json.loads(rebase("datastore", "info", str(out), "--json").stdout)
    assert info["counts"]["vectors"] == 40 and info["sources"][0]["state"] == "complete"


def _bad_inputs(root, out):
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text("{not json\n[1, 2]\n")
    (root / "noheader.csv").write_text("1,2,3\n4,5,6\n")
    (root / "notes.txt").write_text("hello")
    (root / "junk").mkdir(exist_ok=True)
    (root / "junk" / "file.bin").write_text("x")
    other = ["--out", str(out)]
    return [
        (["--source", f"files:{root}/missing.jsonl", *other], ["no parquet, jsonl or csv file matches"]),
        (["--source", f"files:{root}/empty.jsonl", *other], ["empty.jsonl: the file is empty"]),
        (["--source", f"files:{root}/broken.jsonl", *other], ["no readable rows", "line 1: not JSON"]),
        (["--source", f"files:{root}/noheader.csv", *other], ["does not look like a header"]),
        (["--source", f"files:{root}/notes.txt", *other], ["unsupported file type"]),
        (["--source", "kaggle:titanic", *other], ["unknown source kind 'kaggle'"]),
        (["--source", "bigbench:no_such_task_here", *other], ["BIG-bench has no task 'no_such_task_here'"]),
        (["--source", f"files:{root}/a.jsonl", "--out", str(root / "junk")], ["is not a rebase datastore"]),
        (["--source", f"files:{root}/a.jsonl", "--out", str(root / "notes.txt")], ["is a file"]),
        (["--source", f"files:{root}/a.jsonl", *other, "--embedder", "builtin:other"], ["built with embedder"]),
        (["--source", f"files:{root}/a.jsonl", *other, "--rows-per-dataset", "5"], ["rows_per_dataset"]),
        (
            ["--source", f"files:{root}/a.jsonl", "--out", str(root / "new"), "--embedder", "builtin:nope"],
            ["unknown built-in model 'builtin:nope'"],
        ),
        (
            [
                "--source",
                f"files:{root}/a.jsonl",
                "--out",
                str(root / "new2"),
                "--embedder",
                "no-such-org/no-such-model",
            ],
            ["could not be fetched"],
        ),
        (["--source", f"files:{root}/a.jsonl", *other, "--embed-concurrency", "3,1"], ["embed_concurrency"]),
        (["--out", str(out)], ["needs --source"]),
        (["--config", str(root / "missing.yaml")], ["config file not found"]),
    ]


def test_bad_inputs_fail_with_one_line_and_keep_the_store(built_store):
    root, out = built_store
    before = (out / MANIFEST).read_text()
    for args, fragments in _bad_inputs(root, out):
        started = time.monotonic()
        result = rebase("datastore", "build", *args, timeout=120)
        assert_one_line_error(result, *fragments)
        assert time.monotonic() - started < 60, args
    assert (out / MANIFEST).read_text() == before  # nothing already produced was touched
    result = rebase("datastore", "build", "--source", f"files:{root}/broken.jsonl", "--out", str(root / "fresh"))
    assert_one_line_error(result, "no readable rows")
    assert not (root / "fresh").exists()  # a store this build would have created is not left half-made
    assert read_manifest(out).counts()["rows"] == 20
    assert_one_line_error(rebase("datastore", "info", str(root / "junk")), "is not a rebase datastore")
    assert_one_line_error(rebase("datastore", "info", str(root / "nowhere")), "no such datastore directory")


def test_a_store_missing_its_data_is_refused_in_one_line(built_store, tmp_path):
    """Seen in a probe: `datastore info` on a folder holding only manifest.json exited 0 and reported its
    rows. A manifest alone, or a store that lost an index shard, is now one line and exit 2."""
    _, out = built_store
    only_manifest = tmp_path / "only-manifest"
    only_manifest.mkdir()
    shutil.copy(out / "manifest.json", only_manifest / "manifest.json")
    assert_one_line_error(
        rebase("datastore", "info", str(only_manifest)), "is damaged", "datasets.parquet", "are missing"
    )
    no_shard = tmp_path / "no-shard"
    shutil.copytree(out, no_shard)
    for shard in (no_shard / "index").glob("*.faiss"):
        shard.unlink()
    assert_one_line_error(rebase("datastore", "info", str(no_shard)), "is damaged", "index/", "missing")
    task = Path(__file__).parents[1] / "jobs" / "tasks" / "nli.yaml"
    result = rebase("retrieve", "--datastore", str(no_shard), "--task", str(task), "--out", str(tmp_path / "r"))
    assert_one_line_error(result, "is damaged")
    assert not (tmp_path / "r").exists()
    assert rebase("datastore", "info", str(out)).returncode == 0  # the whole store is still fine


def test_hf_source_fails_fast_and_clearly_offline(tmp_path, monkeypatch):
    started = time.monotonic()
    result = rebase("datastore", "build", "--source", "hf:squad", "--out", str(tmp_path / "s"), timeout=120)
    assert_one_line_error(result, "hf:squad", "Hugging Face Hub")
    assert time.monotonic() - started < 60
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = rebase("datastore", "build", "--source", "hf:squad", "--out", str(tmp_path / "s"), timeout=120)
    assert_one_line_error(result, "HF_HUB_OFFLINE")
    assert not (tmp_path / "s").exists()


def test_yaml_config_with_flag_override(tmp_path, built_store):
    root, _ = built_store
    config = tmp_path / "store.yaml"
    config.write_text(f"sources: ['files:{root}/a.jsonl']\nout: {tmp_path / 'from_yaml'}\nrows_per_dataset: oops\n")
    assert_one_line_error(rebase("datastore", "build", "--config", str(config)), str(config), "rows_per_dataset")
    result = rebase("datastore", "build", "--config", str(config), "--rows-per-dataset", "7")
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_manifest(tmp_path / "from_yaml").counts()["rows"] == 7


def test_retrieve_command_and_its_bad_inputs(built_store, tmp_path):
    root, out = built_store
    task = tmp_path / "task.yaml"
    task.write_text(
        "name: qa\ninstruction: Answer the question.\nexamples:\n  - {input: question 3, output: answer 3}\n"
        "ban: [files/nothing_like_this]\n"
    )
    result = rebase(
        "retrieve",
        "--datastore",
        str(out),
        "--task",
        str(task),
        "--out",
        str(tmp_path / "r"),
        "--top-k",
        "5",
        "--exact",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("retrieved 5 of top-5 rows (exact) from 1 datasets")
    assert "ban 'files/nothing_like_this' matches no dataset" in result.stderr
    assert json.loads((tmp_path / "r" / "stats.json").read_text())["match_kind"] is True
    every_kind = [*("--datastore", str(out), "--task", str(task), "--out", str(tmp_path / "r3")), "--no-match-kind"]
    assert rebase("retrieve", *every_kind, "--top-k", "5", "--exact").returncode == 0
    assert json.loads((tmp_path / "r3" / "stats.json").read_text())["match_kind"] is False
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: qa\ninstruction: Answer.\nexamples: []\n")
    blank = tmp_path / "blank.yaml"
    blank.write_text("name: qa\ninstruction: ''\nexamples: [{input: a, output: b}]\n")
    common = ["--out", str(tmp_path / "r2"), "--exact"]
    cases = [
        (["--datastore", str(out), "--task", str(empty), *common], ["field 'examples'"]),
        (["--datastore", str(out), "--task", str(blank), *common], ["field 'instruction'"]),
        (["--datastore", str(out), "--task", str(tmp_path / "none.yaml"), *common], ["config file not found"]),
        (["--datastore", str(root), "--task", str(task), *common], ["is not a rebase datastore"]),
        (["--datastore", str(out), "--task", str(task), "--top-k", "999", *common], ["larger than the datastore"]),
        (
            ["--datastore", str(out), "--task", str(task), "--embedder", "builtin:gemma3-270m", *common],
            ["built with embedder"],
        ),
    ]
    for args, fragments in cases:
        assert_one_line_error(rebase("retrieve", *args), *fragments)
    assert not (tmp_path / "r2").exists()


def test_info_into_a_closed_pipe_stops_quietly(built_store):
    """`rebase datastore info DIR | head -1`: the reader is gone before rebase writes (closed at once here)."""
    _, out = built_store
    process = subprocess.Popen(
        [sys.executable, "-m", "rebase", "datastore", "info", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # long before the child has imported rebase and printed anything
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


@pytest.mark.parametrize(
    ("command", "model", "field"),
    [
        (["retrieve"], "RetrieveConfig", "top_k"),
        (["retrieve"], "RetrieveConfig", "depth"),
        (["train"], "TrainConfig", "student"),
        (["datastore", "build"], "DatastoreConfig", "embedder"),
        (["serve"], "ServeConfig", "host"),
        (["serve"], "ServeConfig", "dtype"),
        (["transform"], "TransformConfig", "dtype"),
        (["evaluate"], "EvaluateConfig", "dtype"),
        (["train"], "TrainConfig", "dtype"),
        (["datastore", "build"], "DatastoreConfig", "embed_dtype"),
    ],
)
def test_help_states_the_configs_default(command, model, field, capsys, monkeypatch):
    """A flag's help shows its field's default from config.py: change the default there, the help follows."""
    import rebase.config
    from rebase.cli import main

    info = getattr(rebase.config, model).model_fields[field]
    monkeypatch.setattr(info, "default", "SENTINEL-42")
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"{info.description} (default SENTINEL-42)" in help_text
