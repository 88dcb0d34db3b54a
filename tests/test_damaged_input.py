"""A replay of a probe of careless and damaged input (issue 19): each case is one `rebase` command on real
files, and each must end in exit 2 with one line that says what is wrong, no traceback, and every file
that was there before byte-identical afterwards. (A store missing its data: tests/test_cli.py; `--from`
and `--only` naming different stages: tests/test_pipeline.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_rebase as rebase
from test_transform import NAVIGATE_ROWS, write_retrieved

NAVIGATE = str(Path(__file__).parents[1] / "jobs" / "tasks" / "navigate.yaml")
BINARY = bytes(range(128, 256)) * 2  # not UTF-8 at all
LATIN_1 = "name: café\ninstruction: Réponds.\n".encode("latin-1")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rebase: error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Real stage outputs to damage: a finished retrieval and a transformed directory."""
    root = tmp_path / "inputs"
    root.mkdir()
    write_retrieved(root / "retrieved", NAVIGATE_ROWS)
    transformed = root / "transformed"
    transformed.mkdir()
    records = [{"input": "Take 1 step.", "output": "So the answer is No.", "status": "ok"}]
    pq.write_table(pa.Table.from_pylist(records), transformed / "records.parquet")
    (transformed / "stats.json").write_text(json.dumps({"task": "navigate"}))
    (transformed / "_SUCCESS").write_text("")
    return root


@pytest.mark.parametrize("content", [BINARY, LATIN_1], ids=["binary", "latin-1"])
def test_yaml_that_is_not_utf8(tmp_path, inputs, content):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    before = snapshot(tmp_path)
    message = f"{bad}: not UTF-8 text"
    assert_refused(rebase("retrieve", "--config", str(bad)), message)
    assert_refused(rebase("transform", "--retrieved", str(inputs / "retrieved"), "--task", str(bad),
                          "--out", str(tmp_path / "t")), message)  # fmt: skip
    assert_refused(rebase("run", str(bad)), message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", ["/proc/rebase-probe", "/proc/rebase-probe/deeper"])
def test_an_output_path_that_cannot_be_written_is_refused_before_work(tmp_path, inputs, out):
    before = snapshot(tmp_path)
    commands = [
        ["datastore", "build", "--source", f"files:{inputs}", "--out", out],
        ["retrieve", "--datastore", str(inputs / "no-store"), "--task", NAVIGATE, "--out", out],
        ["transform", "--retrieved", str(inputs / "retrieved"), "--task", NAVIGATE, "--out", out],
        ["train", "--data", str(inputs / "transformed"), "--task", NAVIGATE, "--out", out],
        ["evaluate", "--model", "builtin:gemma3-270m", "--task", NAVIGATE, "--out", out],
    ]
    for command in commands:
        result = rebase(*command)
        expected = "no such datastore directory" if command[0] == "retrieve" else "cannot be written"
        assert_refused(result, expected)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "task": NAVIGATE, "datastore": {"sources": ["bigbench"]}}))
    before[str(pipeline.relative_to(tmp_path))] = pipeline.read_bytes()
    assert_refused(rebase("run", str(pipeline), "--run-dir", out), "--run-dir", "cannot be written")
    assert snapshot(tmp_path) == before


def test_damaged_stage_outputs(tmp_path, inputs):
    (inputs / "transformed" / "records.parquet").write_bytes(b"not parquet")
    bad_rows = inputs / "retrieved" / "rows.parquet"
    table = pq.read_table(bad_rows)
    rows = table.column("row").to_pylist()
    rows[1] = "{not json"
    pq.write_table(table.set_column(table.schema.get_field_index("row"), "row", pa.array(rows)), bad_rows)
    other = write_retrieved(tmp_path / "stats-not-an-object", NAVIGATE_ROWS)
    (other / "stats.json").write_text("[1, 2, 3]")
    before = snapshot(tmp_path)
    out = str(tmp_path / "out")
    assert_refused(
        rebase("train", "--data", str(inputs / "transformed"), "--task", NAVIGATE, "--out", out),
        "records.parquet is damaged (not a readable parquet file)",
    )
    assert_refused(
        rebase("transform", "--retrieved", str(inputs / "retrieved"), "--task", NAVIGATE, "--out", out),
        "row uid0002 is not a JSON object",
    )
    assert_refused(
        rebase("transform", "--retrieved", str(other), "--task", NAVIGATE, "--out", out),
        "stats.json is damaged (not a JSON object)",
    )
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"run.json": b"{oops"}, "run.json is damaged (not a JSON object)"),
        ({"run.json": b'{"name": "p"}'}, "run.json is damaged (no stages)"),
        ({"retrieve/stats.json": b'"a string"'}, "retrieve/stats.json is damaged (not a JSON object)"),
        ({"pipeline.yaml": BINARY}, "pipeline.yaml: not UTF-8 text"),
    ],
    ids=["run.json", "run.json-no-stages", "stats.json", "pipeline.yaml"],
)
def test_status_of_a_damaged_run(tmp_path, damage, message):
    run_dir = tmp_path / "run"
    (run_dir / "retrieve").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "p", "stages": {"retrieve": {"state": "done"}}}))
    (run_dir / "pipeline.yaml").write_text(
        yaml.safe_dump({"name": "p", "task": NAVIGATE, "datastore": {"sources": ["bigbench"]}})
    )
    (run_dir / "retrieve" / "stats.json").write_text(json.dumps({"rows": 3, "mode": "exact"}))
    (run_dir / "retrieve" / "_SUCCESS").write_text("")
    for name, content in damage.items():
        (run_dir / name).write_bytes(content)
    before = snapshot(tmp_path)
    assert_refused(rebase("status", str(run_dir)), message)
    assert snapshot(tmp_path) == before
