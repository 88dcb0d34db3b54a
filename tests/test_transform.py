"""The transform stage on real Ray with the real built-in teacher, its resume, and the OpenAI engine against
a real HTTP server on loopback (tests/openai_server.py). Tests of the machinery (a killed run, the decode
loop, the OpenAI engine's retries) use the tiny random-weight Gemma 3 (conftest.py) as the teacher."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from processes import kill_when

from rebase.config import TransformConfig, build_config
from rebase.errors import RebaseError
from rebase.teacher import transform

REVIEWS = [
    "The acting was wonderful and the story moved me.",
    "A dull, overlong film with a silly plot.",
    "I loved every minute of this charming comedy.",
    "The worst meal I have had in years; cold and bland.",
    "Friendly staff and a beautiful view from the terrace.",
    "The battery died after two days and support never answered.",
    "Crisp sound, easy set-up, great value for the price.",
    "Boring lectures and a confusing textbook.",
]
TASK = {
    "name": "sentiment",
    "instruction": "Is the review positive or negative?",
    "examples": [
        {"input": "Great food and kind waiters.", "output": "positive"},
        {"input": "The room was dirty and noisy.", "output": "negative"},
    ],
    "labels": ["positive", "negative"],
}


# Rows BIG-bench gave for the navigate task (bigbench/goal_step_wikihow and bigbench/physical_intuition).
NAVIGATE_ROWS = [
    {
        "input": "In order to 'Make a Clothes Line', one can 'Measure the posts' and 'Cut the angles in your "
        "crossbeams'. Which should happen first?",
        "output": "Measure the posts.",
    },
    {
        "input": "I stand to your left and you pass a ball to me. Which direction does the ball travel?",
        "output": "Left",
    },
    {
        "input": "In order to 'Set up a Dome Tent', one can 'Lay out all the parts of the tent on the tarp' and "
        "'Lay down the tarp'. Which should happen first?",
        "output": "Lay down the tarp.",
    },
    {"input": "You walk ten steps north, then ten steps south. Where are you?", "output": "Where I started."},
]


def write_retrieved(directory: Path, rows: list[dict]) -> Path:
    """A finished retrieval holding `rows` best first (the layout `rebase retrieve` writes)."""
    directory.mkdir()
    table = [
        {
            "rank": rank,
            "row_uid": f"uid{rank:04d}",
            "dataset_id": "local/a" if rank % 2 else "local/b",
            "score": 1.0 - rank / 100,
            "input_score": 0.5,
            "output_score": 0.5,
            "description_score": 0.5,
            "row": json.dumps(row),
        }
        for rank, row in enumerate(rows, 1)
    ]
    pq.write_table(pa.Table.from_pylist(table), directory / "rows.parquet")
    (directory / "stats.json").write_text(json.dumps({"fingerprint": "test"}))
    (directory / "_SUCCESS").write_text("")
    return directory


@pytest.fixture
def retrieved(tmp_path) -> Path:
    """Eight short review rows: short answers keep the model-backed tests quick."""
    return write_retrieved(
        tmp_path / "retrieved", [{"text": text, "stars": str(1 + n % 5)} for n, text in enumerate(REVIEWS)]
    )


@pytest.fixture
def task_file(tmp_path) -> Path:
    path = tmp_path / "sentiment.yaml"
    path.write_text(yaml.safe_dump(TASK))
    return path


def config(retrieved: Path, task_file: Path, out: Path, **fields) -> TransformConfig:
    """Gates that ask the teacher again or drop whole labels are off unless a test is about them
    (tests/test_gates.py): a random-weight teacher's second answers would only slow the machinery tests."""
    values = {"retrieved": retrieved, "task": task_file, "out": out, "max_new_tokens": 96, "batch_size": 4}
    values |= {"consistency": False, "max_label_share": 1.0}
    return build_config(TransformConfig, {**values, **fields})


def records(out: Path) -> list[dict]:
    return pq.read_table(out / "records.parquet").to_pylist()


@pytest.fixture(scope="module")
def tiny_engine(tiny_gemma):
    from rebase.generate.engines import TransformersEngine

    return TransformersEngine(str(tiny_gemma), batch_size=4)


# ------------------------------------------------------------------ bad input (no model needed)


def test_bad_inputs_are_one_line_errors(retrieved, task_file, tmp_path):
    with pytest.raises(RebaseError, match="is not a finished retrieval"):
        transform(config(tmp_path / "nowhere", task_file, tmp_path / "out"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RebaseError, match="not a rebase transform"):
        transform(config(retrieved, task_file, foreign))
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(RebaseError, match="^command line: engine openai needs base_url"):
        config(retrieved, task_file, tmp_path / "out", engine="openai")
    with pytest.raises(RebaseError, match="field 'concurrency'"):
        config(retrieved, task_file, tmp_path / "out", concurrency=(2, 1))


def test_cli_reports_a_missing_retrieval_in_one_line(tmp_path, task_file):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rebase",
            "transform",
            "--retrieved",
            str(tmp_path / "none"),
            "--task",
            str(task_file),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"rebase: error: {tmp_path / 'none'} is not a finished retrieval (no _SUCCESS and rows.parquet); "
        "run rebase retrieve"
    ]


# ------------------------------------------------------------------ the built-in teacher on real Ray


@pytest.mark.slow
def test_transform_with_the_builtin_teacher_then_resume(tmp_path):
    """The shipped navigate task (chain of thought, labels) on rows BIG-bench retrieved for it, in one batch."""
    retrieved = write_retrieved(tmp_path / "retrieved", NAVIGATE_ROWS)
    task_file = Path(__file__).parents[1] / "jobs" / "tasks" / "navigate.yaml"
    out = tmp_path / "transformed"
    summary = transform(config(retrieved, task_file, out, limit=3, max_new_tokens=320))
    assert (summary.rows, summary.sent, summary.cached) == (3, 3, 0)
    found = records(out)
    assert [r["rank"] for r in found] == [1, 2, 3]
    assert [r["row_uid"] for r in found] == ["uid0001", "uid0002", "uid0003"]
    # Constrained decoding: every answer parses, ends in a label, and carries reasoning.
    assert all(r["status"] != "parse_error" for r in found), [r["reason"] for r in found]
    assert all(r["answer"] in ("Yes", "No") for r in found)
    assert all(r["output"] == f"{r['reasoning']} So the answer is {r['answer']}." for r in found)
    # The 270M base teacher often repeats the first example's reasoning: such records are rejected, with why.
    assert all(r["status"] == "ok" or r["reason"] for r in found)
    for record in found:
        assert record["teacher"] == "builtin:gemma3-270m" and len(record["prompt_hash"]) == 24
        assert json.loads(record["row"]) in NAVIGATE_ROWS
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 3 and sum(stats["statuses"].values()) == 3
    assert stats["completion_tokens"] > 3 * 10 and stats["prompt_tokens"] > 3 * 300
    assert (out / "_SUCCESS").exists()

    # Resumed: nothing left to send. (A run that grows, or follows a killed one, sends only what is new:
    # test_killed_transform_resends_only_the_unanswered_prompts, on the tiny model.)
    again = transform(config(retrieved, task_file, out, limit=3, max_new_tokens=320))
    assert (again.sent, again.cached) == (0, 3)
    assert records(out) == found

    with pytest.raises(RebaseError, match="holds a rebase transform made from other inputs or settings"):
        transform(config(retrieved, task_file, out, max_new_tokens=50))


FIRST_STEP_TASK = {
    "name": "first_step",
    "instruction": "Given a goal and two steps, is the first step listed the one that should happen first? "
    "Answer Yes or No.",
    "examples": [
        {
            "input": "In order to 'Bake bread', one can 'Knead the dough' and 'Slice the loaf'. Which should "
            "happen first?",
            "output": "Yes",
        },
        {
            "input": "In order to 'Paint a wall', one can 'Let the paint dry' and 'Open the paint can'. Which "
            "should happen first?",
            "output": "No",
        },
    ],
    "labels": ["Yes", "No"],
}


@pytest.mark.slow
def test_judge_pass_with_the_builtin_teacher(tmp_path):
    """A labelled task without reasoning: the small teacher makes usable records from the rows, and the
    judge pass asks about each ok one; a directory seeded with the answers sends only the judge's questions.
    (The built-in's short answers cost less here than the tiny model's: under the schema a random-weight
    model writes its strings up to their length bound.)"""
    retrieved = write_retrieved(tmp_path / "retrieved", NAVIGATE_ROWS)
    task_file = tmp_path / "first_step.yaml"
    task_file.write_text(yaml.safe_dump(FIRST_STEP_TASK))
    out = tmp_path / "transformed"
    transform(config(retrieved, task_file, out, max_new_tokens=160))
    ok_before = [r for r in records(out) if r["status"] == "ok"]
    assert len(ok_before) >= 2, [(r["status"], r["reason"]) for r in records(out)]
    assert all(r["output"] in ("Yes", "No") and r["reasoning"] is None for r in ok_before)

    judged = tmp_path / "judged"
    judged.mkdir()
    shutil.copytree(out / "answers", judged / "answers")
    summary = transform(config(retrieved, task_file, judged, max_new_tokens=160, judge=True))
    assert summary.sent == len(ok_before) and summary.cached == len(NAVIGATE_ROWS)
    assert len(pq.read_table(judged / "judged").to_pylist()) == len(ok_before)
    after = {r["row_uid"]: r for r in records(judged)}
    for record in ok_before:
        assert after[record["row_uid"]]["status"] == "ok" or after[record["row_uid"]]["reason"] in (
            "the judge said no",
            "the judge answered neither yes nor no",
        )
    assert json.loads((judged / "stats.json").read_text())["settings"]["judge"] is True


@pytest.mark.slow
def test_killed_transform_resends_only_the_unanswered_prompts(retrieved, task_file, tmp_path, tiny_gemma, rebase_env):
    out = tmp_path / "transformed"
    command = [
        sys.executable,
        "-m",
        "rebase",
        "transform",
        "--retrieved",
        str(retrieved),
        "--task",
        str(task_file),
        "--out",
        str(out),
        "--teacher",
        str(tiny_gemma),
        "--prompts-per-call",
        "1",
        "--max-new-tokens",
        "64",
        "--no-consistency",
    ]
    answers = out / "answers"
    # The killed run (6 of the 8 rows) has a Ray of its own, killed with it; the re-run, grown to all 8
    # rows, joins the session's.
    kill_when([*command, "--limit", "6"], lambda: len(list(answers.glob("part-*.parquet"))) >= 2, "transform")
    kept = {p.name: p.stat().st_mtime_ns for p in answers.glob("part-*.parquet")}
    answered = sum(pq.read_metadata(answers / name).num_rows for name in kept)
    assert 2 <= answered < 6
    assert not (out / "_SUCCESS").exists()

    result = subprocess.run(command, capture_output=True, text=True, env=rebase_env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert f"{len(REVIEWS) - answered} sent, {answered} answered before" in summary
    for name, mtime in kept.items():
        assert (answers / name).stat().st_mtime_ns == mtime
    assert sorted(r["rank"] for r in records(out)) == list(range(1, len(REVIEWS) + 1))


@pytest.mark.slow
def test_continuous_batching_with_a_shared_prefix_gives_plain_generate_text(tiny_engine):
    """Our decode loop (rows leave and join the batch, shared-prefix cache, left padding, prompts longer
    than the sliding window) must produce what `generate` produces for each prompt alone, greedy."""
    import torch

    from rebase.generate.engines import GenerationParams

    head = "Rewrite the review in one short sentence. Keep its meaning and its sentiment. " * 4
    prompts = [f"{head}\nReview: {text}\nRewritten:" for text in REVIEWS[:5]]
    params = GenerationParams(max_new_tokens=12)
    tiny_engine.batch_size = 2  # five prompts through two places: rows finish and new ones join
    try:
        ours = tiny_engine.generate(prompts + ["The capital of France is"], params)
    finally:
        tiny_engine.batch_size = 4
    tokenizer, model = tiny_engine.tokenizer, tiny_engine.model
    for completion, prompt in zip(ours, prompts + ["The capital of France is"]):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**encoded, max_new_tokens=12, do_sample=False, top_p=None, top_k=None)
        new = output[0, encoded["input_ids"].shape[1] :].tolist()
        stop = next((n for n, token in enumerate(new) if token in tiny_engine.stop_ids), len(new))
        assert completion.text == tokenizer.decode(new[:stop], skip_special_tokens=True)
        assert completion.completion_tokens == stop and completion.prompt_tokens == encoded["input_ids"].shape[1]


# ------------------------------------------------------------------ the openai engine over real HTTP


@pytest.mark.slow
def test_openai_engine_retries_429_and_5xx(retrieved, task_file, tmp_path, tiny_engine):
    from openai_server import ChatServer

    with ChatServer(tiny_engine) as server:
        server.fail_with = [429, 503]
        out = tmp_path / "transformed"
        summary = transform(
            config(
                retrieved,
                task_file,
                out,
                limit=3,
                engine="openai",
                base_url=server.base_url,
                teacher="teacher",
                request_concurrency=1,
                max_new_tokens=256,  # room for the tiny teacher's bounded strings to close
            )
        )
        assert summary.statuses.get("failed", 0) == 0
        assert server.generation_requests == 3 + 2  # two refused attempts, retried with backoff
        found = records(out)
        # json_schema response_format reached the model: a random-weight model only writes labels under it
        assert all(r["status"] != "parse_error" for r in found), [r["reason"] for r in found]
        assert all(r["output"] in ("positive", "negative") for r in found)


@pytest.mark.slow
def test_openai_failures_are_kept_and_resent(retrieved, task_file, tmp_path, tiny_engine):
    from openai_server import ChatServer

    with ChatServer(tiny_engine) as server:
        server.fail_with = [500] * 4  # two prompts x (one attempt + one retry)
        out = tmp_path / "transformed"
        settings = {
            "engine": "openai",
            "base_url": server.base_url,
            "teacher": "teacher",
            "max_retries": 1,
            "request_concurrency": 1,
            "limit": 3,
        }
        first = transform(config(retrieved, task_file, out, **settings))
        assert first.statuses["failed"] == 2 and first.sent == 3
        failed = [r for r in records(out) if r["status"] == "failed"]
        assert [r["reason"] for r in failed] == ["InternalServerError 500"] * 2
        second = transform(config(retrieved, task_file, out, **settings))
        assert (second.sent, second.cached) == (2, 1)
        assert second.statuses.get("failed", 0) == 0


@pytest.mark.slow
def test_rate_limits_hold_across_the_pool_and_a_429_pauses_all_of_it(retrieved, task_file, tmp_path, tiny_engine):
    """Eight prompts from two actors with four requests in flight each, under rpm 120 (a request every 0.5 s
    for the pool): the server notes when each arrives. Its first answer is a 429 asking for 2 s: no request
    from either actor arrives during them, the refused one is sent again, and the cost is what the
    endpoint's usage says at the configured prices."""
    from openai_server import ChatServer

    with ChatServer(tiny_engine) as server:
        server.fail_with, server.retry_after = [429], 2
        out = tmp_path / "transformed"
        limits = {"rpm": 120, "price_input_per_million": 1.5, "price_output_per_million": 6.0}
        settings = {"engine": "openai", "base_url": server.base_url, "teacher": "teacher", "max_new_tokens": 32}
        pool = {"concurrency": (2, 2), "request_concurrency": 4, "prompts_per_call": 4}
        summary = transform(config(retrieved, task_file, out, **settings, **pool, **limits))
        times = list(server.times)
    assert summary.sent == 8 and summary.statuses.get("failed", 0) == 0
    assert len(times) == 9  # eight, and the refused one again
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert gaps[0] >= 1.95, gaps  # the Retry-After held the whole pool
    assert min(gaps) >= 0.45, gaps  # never two requests closer than rpm 120 allows, the retry included
    assert (len(times) - 1) / (times[-1] - times[0]) * 60 <= 120
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rate_limits"]["rpm"] == 120 and stats["rate_limits"]["tpm"] is None
    assert stats["rate_limits"]["requests"] == 9 and stats["rate_limits"]["retry_after_pauses"] == 1
    answers = pq.read_table(out / "answers").to_pylist()
    cost = stats["cost"]
    assert cost["prompt_tokens"] == sum(a["prompt_tokens"] for a in answers) > 0
    assert cost["completion_tokens"] == sum(a["completion_tokens"] for a in answers) > 0
    assert cost["usd"] == pytest.approx((cost["prompt_tokens"] * 1.5 + cost["completion_tokens"] * 6.0) / 1e6, abs=1e-6)


def test_dry_run_prints_the_prompts_tokens_and_cost_and_sends_nothing(retrieved, task_file, tmp_path):
    from openai_server import ChatServer

    with ChatServer(None) as server:
        out = tmp_path / "transformed"
        command = [sys.executable, "-m", "rebase", "transform", "--retrieved", str(retrieved), "--task"]
        command += [str(task_file), "--out", str(out), "--engine", "openai", "--base-url", server.base_url]
        command += ["--teacher", "teacher", "--max-new-tokens", "100", "--price-input-per-million", "2"]
        command += ["--price-output-per-million", "8", "--limit", "5", "--dry-run"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert server.requests == 0  # not even the start-up check
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "dry run: 5 retrieved rows, 0 not sent (contaminated or the same prompt), 0 answered before; "
        "5 prompts to send to teacher (openai)"
    )
    prompt_tokens = int(lines[1].split()[1].replace(",", ""))
    assert lines[1].endswith("; at most 500 out (5 x max_new_tokens 100)") and "estimated at 4 characters" in lines[1]
    cost_in, cost_out = prompt_tokens * 2 / 1e6, 500 * 8 / 1e6
    assert lines[2].startswith(f"projected cost: ${cost_in:.4f} in + at most ${cost_out:.4f} out")
    assert "first prompt:" in lines and REVIEWS[0] in result.stdout
    assert not out.exists()  # nothing written, no lock taken


@pytest.mark.parametrize(
    "flag, value", [("--rpm", "0"), ("--tpm", "-5"), ("--price-input-per-million", "-1"), ("--rpm", "lots")]
)
def test_negative_limits_and_prices_are_one_line_and_exit_2(retrieved, task_file, tmp_path, flag, value):
    command = [sys.executable, "-m", "rebase", "transform", "--retrieved", str(retrieved), "--task", str(task_file)]
    command += ["--out", str(tmp_path / "out"), flag, value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert flag.lstrip("-").replace("-", "_") in result.stderr or flag in result.stderr


def test_openai_engine_refuses_a_bad_key_before_any_work(retrieved, task_file, tmp_path, monkeypatch):
    from openai_server import ChatServer

    monkeypatch.setenv("TEACHER_KEY", "wrong")
    with ChatServer(None, api_key="right") as server:
        with pytest.raises(RebaseError, match=r"refused the API key from \$TEACHER_KEY"):
            transform(
                config(
                    retrieved,
                    task_file,
                    tmp_path / "out",
                    engine="openai",
                    base_url=server.base_url,
                    teacher="teacher",
                    api_key_env="TEACHER_KEY",
                )
            )
        assert server.requests == 1
        assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind
    with pytest.raises(RebaseError, match="cannot reach the OpenAI-compatible endpoint"):
        transform(
            config(
                retrieved,
                task_file,
                tmp_path / "out2",
                engine="openai",
                base_url=f"http://127.0.0.1:{server.port}/v1",
                teacher="teacher",
            )
        )
