"""The run report on a small run directory built here: plots as SVG files, markdown that shows them, HTML
that escapes row text, sections for stages not run yet, and the page as headless Chromium draws it."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from browser import needs_chromium, render, screenshot

from rebase.report import write_report

ALL_STAGES = ("datastore", "retrieve", "transform", "train", "evaluate")
ALL_PLOTS = {"datasets", "scores", "statuses", "loss", "metrics", "stages"}
SCRIPT_ROW = "<script>alert(1)</script>"
SECONDS = {"datastore": 12.5, "retrieve": 3.25, "transform": 95.0, "train": 515.3, "evaluate": 223.8}

# (dataset, input, output) of the retrieved rows, in rank order.
SOURCE_ROWS = [
    ("bigbench/navigate_like", "Take 3 steps. Turn around. Take 3 steps.", "True"),
    ("bigbench/navigate_like", "Take 1 step. Take 2 steps left.", "False"),
    ("bigbench/logic", f"Is {SCRIPT_ROW} a tag? a | b", "yes"),
    ("bigbench/navigate_like", "Always face forward. Take 2 steps back.", "False"),
    ("glue/qnli", "Which city is the capital of France?", "Paris"),
    ("bigbench/logic", "If p then q; p. Does q hold?", "yes"),
    ("glue/qnli", "Who wrote Hamlet?", "Shakespeare"),
    ("bigbench/navigate_like", "Take 5 steps forward. Take 5 steps backward.", "True"),
]
STATUSES = ["ok", "rejected", "ok", "duplicate", "parse_error", "ok", "rejected", "ok"]


def make_run_dir(path: Path, stages: tuple[str, ...] = ALL_STAGES) -> Path:
    """A run directory with the files the given stages write (real schemas, a few rows), and its run.json."""
    path.mkdir(parents=True, exist_ok=True)
    run = {"name": "navigate-small", "task": "navigate", "stages": {}}
    for stage in stages:
        run["stages"][stage] = {
            "state": "done",
            "seconds": SECONDS[stage],
            "started": "2025-01-02T10:00:00+00:00",
            "finished": "2025-01-02T10:05:00+00:00",
        }
        (path / stage).mkdir(exist_ok=True)
        _STAGE_WRITERS[stage](path / stage)
        (path / stage / "_SUCCESS").write_text("")
    (path / "run.json").write_text(json.dumps(run, indent=2))
    return path


def _write_datastore(out: Path) -> None:
    stats = {"path": "out/datastore/store", "datasets": 3, "rows": 120, "cells": 300, "seconds": 12.5}
    (out / "stats.json").write_text(json.dumps(stats))


def _source_row(dataset: str, text: str, answer: str) -> str:
    return json.dumps({"input": text, "output": answer, "source": dataset})


def _write_retrieve(out: Path) -> None:
    count = len(SOURCE_ROWS)
    scores = [0.9 - 0.05 * i for i in range(count)]
    table = pa.table(
        {
            "rank": pa.array(range(1, count + 1), pa.int64()),
            "row_uid": pa.array([f"uid{i:04d}" for i in range(count)], pa.string()),
            "dataset_id": pa.array([dataset for dataset, _, _ in SOURCE_ROWS], pa.string()),
            "score": pa.array(scores, pa.float32()),
            "input_score": pa.array([s + 0.02 for s in scores], pa.float32()),
            "output_score": pa.array([s - 0.1 for s in scores], pa.float32()),
            "description_score": pa.array([0.5] * count, pa.float32()),
            "row": pa.array([_source_row(*row) for row in SOURCE_ROWS], pa.string()),
        }
    )
    pq.write_table(table, out / "rows.parquet")
    stats = {
        "task": "navigate",
        "top_k": count,
        "rows": count,
        "mode": "exact",
        "ban": ["bigbench/navigate"],
        "match_kind": True,
        "kinds": ["words"],
        "off_kind": 2659,
        "contamination": {"checked": True, "eval_inputs": 1000, "ngram": 13, "similarity_threshold": 0.9996,
                          "contaminated": 3, "by_ngram": 3, "by_similarity": 0},
        "seconds": 3.25,
    }  # fmt: skip
    (out / "stats.json").write_text(json.dumps(stats))


def _write_transform(out: Path) -> None:
    reasons = {"rejected": "copies a few-shot example", "duplicate": "same input", "parse_error": "broken JSON"}
    records = []
    for rank, ((dataset, text, answer), status) in enumerate(zip(SOURCE_ROWS, STATUSES), start=1):
        reasoning = f"Teacher reasoning for row {rank}."
        records.append(
            {
                "rank": rank,
                "row_uid": f"uid{rank - 1:04d}",
                "dataset_id": dataset,
                "input": f"Rewritten: {text}",
                "output": f"{reasoning} So the answer is {answer}.",
                "reasoning": reasoning,
                "answer": answer,
                "status": status,
                "reason": reasons.get(status, ""),
                "teacher": "builtin:gemma3-270m",
                "prompt_hash": f"hash{rank}",
                "row": _source_row(dataset, text, answer),
            }
        )
    schema = pa.schema([("rank", pa.int64())] + [(name, pa.string()) for name in list(records[0])[1:]])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), out / "records.parquet")
    statuses = {status: STATUSES.count(status) for status in dict.fromkeys(STATUSES)}
    stats = {"task": "navigate", "teacher": "builtin:gemma3-270m", "engine": "transformers", "rows": len(records)}
    stats |= {"statuses": statuses, "reasons": {reasons[s]: n for s, n in statuses.items() if s in reasons}}
    stats |= {"gates": {"off task": 2, "near duplicate": 0, "inconsistent": 1}, "fit_threshold": 0.6989}
    stats |= {"contamination": {"checked": False, "why": "decontamination is off"}}
    stats |= {"cost": {"prompt_tokens": 120000, "completion_tokens": 30000, "price_input_per_million": 0.15,
                       "price_output_per_million": 0.6, "usd": 0.036}}  # fmt: skip
    stats |= {"rate_limits": {"rpm": 500, "tpm": None, "requests": 14, "waited_seconds": 1.5, "retry_after_pauses": 1}}
    (out / "stats.json").write_text(json.dumps(stats))


def _write_train(out: Path) -> None:
    losses = [[step, round(2.0 / step, 4)] for step in range(1, 13)]
    summary = {"student": "builtin:gemma3-270m", "method": "LoRA r=16", "examples": 4, "steps": 12}
    summary |= {"first_loss": losses[0][1], "final_loss": losses[-1][1], "seconds": 515.3, "losses": losses}
    (out / "stats.json").write_text(json.dumps({"task": "navigate", "summary": summary}))


def _write_evaluate(out: Path) -> None:
    stats = {
        "task": "navigate",
        "data": "bigbench:navigate",
        "examples": 120,
        "models": {
            "out/runs/navigate-small/train": {"exact_match": 0.45, "accuracy": 0.45},
            "builtin:gemma3-270m": {"exact_match": 0.0083, "accuracy": 0.0333},
            "builtin:gemma3-270m (few-shot)": {"exact_match": 0.3, "accuracy": 0.4167},
            "majority label (Yes)": {"exact_match": 0.5083, "accuracy": 0.5083},
        },
        "roles": {
            "out/runs/navigate-small/train": "student",
            "builtin:gemma3-270m": "base",
            "builtin:gemma3-270m (few-shot)": "base few-shot",
            "majority label (Yes)": "majority",
        },
        "intervals": {"out/runs/navigate-small/train": {"accuracy": [0.3641, 0.5389], "exact_match": [0.3641, 0.5389]}},
        "margin": {
            "metric": "accuracy",
            "over": "majority label (Yes)",
            "role": "majority",
            "value": -0.0583,
            "low": -0.1833,
            "high": 0.0667,
        },
        "seconds": 223.8,
    }
    (out / "stats.json").write_text(json.dumps(stats))


_STAGE_WRITERS = {
    "datastore": _write_datastore,
    "retrieve": _write_retrieve,
    "transform": _write_transform,
    "train": _write_train,
    "evaluate": _write_evaluate,
}


def _plot_text(svg_path: Path) -> list[str]:
    """The text elements of an SVG plot (matplotlib keeps text as text in the report's style)."""
    root = ElementTree.parse(svg_path).getroot()
    return ["".join(node.itertext()) for node in root.iter("{http://www.w3.org/2000/svg}text")]


def test_every_plot_is_an_svg_file_with_the_runs_numbers(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    assert write_report(run_dir) == run_dir / "report.html"
    plots = {path.stem: path for path in (run_dir / "report").iterdir()}
    assert set(plots) == ALL_PLOTS
    for path in plots.values():
        assert path.suffix == ".svg"
        assert ElementTree.parse(path).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    datasets = _plot_text(plots["datasets"])
    assert {"bigbench/navigate_like", "bigbench/logic", "glue/qnli"} <= set(datasets)
    assert {"4", "2"} <= set(datasets)  # navigate_like has 4 rows; logic and qnli 2 each
    statuses = _plot_text(plots["statuses"])
    assert {"ok", "rejected", "duplicate", "parse_error"} <= set(statuses) and "4" in statuses
    assert {"0.45", "0.03", "0.01"} <= set(_plot_text(plots["metrics"]))
    assert {"8m 35s", "3m 44s", "3.2s"} <= set(_plot_text(plots["stages"]))  # train, evaluate, retrieve


def test_markdown_shows_every_plot_and_the_headline(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    write_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    images = re.findall(r"!\[[^\]]+\]\((report/[a-z]+\.svg)\)", markdown)
    assert sorted(images) == sorted(f"report/{name}.svg" for name in ALL_PLOTS)
    assert all((run_dir / image).is_file() for image in images)
    assert markdown.startswith("# Run navigate-small\n")
    assert (
        "Student 45.0% vs best baseline (majority) 50.8% accuracy on 120 examples of bigbench:navigate: "
        "margin -5.8% (95% -18.3% to +6.7%)." in markdown
    )
    assert "| student | out/runs/navigate-small/train | 0.45 [0.364, 0.539] | 0.45 [0.364, 0.539] |" in markdown
    assert "Margin over the best baseline (majority: majority label (Yes)): -0.058 accuracy" in markdown
    assert "| train | done | 8m 35s | 2025-01-02 10:00:00 | 2025-01-02 10:05:00 |" in markdown
    assert "not run yet" not in markdown
    assert "task fit needs similarity 0.70 to the task's example inputs" in markdown
    assert "| off task | 2 |" in markdown and "| inconsistent | 1 |" in markdown
    assert "; 2,659 candidates left out as not words like the task's inputs." in markdown
    assert (
        "Compared with the task's 1,000 evaluation inputs: 3 retrieved rows copy one (3 by a 13-gram in common, "
        "0 by embedding similarity of 0.9996 or more)." in markdown
    )
    assert "Not compared with the evaluation set: decontamination is off." in markdown
    assert "requests cost $0.0360 (120,000 tokens in, 30,000 out, at 0.15 and 0.6 USD per million)" in markdown
    assert "Rate limits rpm 500, tpm None: 14 requests, 1.5 s spent waiting for slots, 1 pauses for" in markdown


def test_html_inlines_the_plots_and_escapes_row_text(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    page = write_report(run_dir).read_text()
    assert page.count('<figure class="plot"') == len(ALL_PLOTS)
    assert "report/" not in page  # self-contained: no links to the SVG files
    assert SCRIPT_ROW not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "alert(1)" not in (run_dir / "report.md").read_text().replace("&lt;script&gt;alert(1)&lt;/script&gt;", "")


def test_examples_show_ok_rows_first_beside_the_teachers_output(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    page = write_report(run_dir).read_text()
    examples = page[page.index("teacher&#x27;s example") :]
    shown = re.findall(r"<td>#(\d+) ", examples)
    assert shown == ["1", "3", "6", "8", "2"]  # the four ok rows by rank, then the best other row
    assert "output: Teacher reasoning for row 1. So the answer is True." in examples
    assert "reasoning: Teacher reasoning" not in examples  # the output already holds the reasoning
    assert "status: rejected (copies a few-shot example)" in examples
    assert "source: bigbench/navigate_like" in examples  # the source row's own fields


def test_a_run_with_only_datastore_and_retrieve_says_what_has_not_run(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    write_report(run_dir)  # a full report first: its later plots must not linger
    for stage in ("transform", "train", "evaluate"):
        for path in (run_dir / stage).iterdir():
            path.unlink()
        (run_dir / stage).rmdir()
    run = json.loads((run_dir / "run.json").read_text())
    run["stages"] = {stage: run["stages"][stage] for stage in ("datastore", "retrieve")}
    (run_dir / "run.json").write_text(json.dumps(run))
    write_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert {path.stem for path in (run_dir / "report").iterdir()} == {"datasets", "scores", "stages"}
    for line in ("Base vs student accuracy: not run yet.", "Teacher transform: not run yet.", "Training: not run yet."):
        assert line in markdown
    assert "Evaluation: not run yet." in (run_dir / "report.html").read_text()


def test_a_failed_stage_and_a_missing_run_json_still_give_a_report(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", stages=("datastore", "retrieve"))
    run = json.loads((run_dir / "run.json").read_text())
    run["stages"]["transform"] = {"state": "failed", "seconds": 4.0, "started": "2025-01-02T10:06:00", "finished": None}
    (run_dir / "run.json").write_text(json.dumps(run))
    write_report(run_dir)
    assert "Teacher transform: failed (see the log)." in (run_dir / "report.md").read_text()
    (run_dir / "run.json").unlink()
    write_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# Run run\n") and "Task: navigate" in markdown
    assert {"12.5s", "3.2s"} <= set(_plot_text(run_dir / "report" / "stages.svg"))  # from each stats.json


@needs_chromium
def test_chromium_draws_every_plot(tmp_path):
    full = write_report(make_run_dir(tmp_path / "full"))
    partial = write_report(make_run_dir(tmp_path / "partial", stages=("datastore", "retrieve")))
    dom = render(full, tmp_path)
    assert f'data-rendered-plots="{len(ALL_PLOTS)}"' in dom
    assert all(f'id="plot-{name}"' in dom for name in ALL_PLOTS)
    assert "<script>alert(1)</script>" not in dom
    assert 'data-rendered-plots="3"' in render(partial, tmp_path)


@needs_chromium
def test_chromium_screenshot_of_the_report_is_not_blank(tmp_path):
    page = write_report(make_run_dir(tmp_path / "run"))
    png = screenshot(page, tmp_path, tmp_path / "report.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 50_000  # a blank 1200x3000 page compresses to a few KB
