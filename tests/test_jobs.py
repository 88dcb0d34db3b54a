"""The pipeline as a Ray job: a head started on loopback by the test, `ray job submit` of the smoke pipeline,
its driver killed in the middle, the same submission again resuming to SUCCEEDED, and the run's report
opened in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import render
from openai import OpenAI
from openai_server import free_port
from processes import is_loopback, listening
from smoke_pipeline import write_smoke_pipeline

REPO = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# Ray's token authentication, as the README sets it up, with a token of the test's own instead of ~/.ray's.
RAY_ENV = {
    **{key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"},
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the README's one-machine head: every Ray process on loopback
}


@dataclass(frozen=True)
class RayHead:
    jobs: str  # the job server's address, for `ray job`
    gcs: str  # the cluster's address, for a driver to join through RAY_ADDRESS
    pid: int  # `ray start`'s, whose descendants are the head's processes


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group, its job server on 127.0.0.1; its addresses."""
    port, dashboard = free_port(), free_port()
    # A temp dir of its own (short: Ray's socket paths must fit 107 bytes) keeps the head out of
    # /tmp/ray/ray_current_cluster, where other Ray programs on this machine would find it.
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    command = [RAY, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}"]
    command += ["--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    command += [f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    # The agents' default ports are taken when another Ray runs here (the test session's own): a head whose
    # job agent cannot bind answers "No available agent" to every submission.
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port"):
        command.append(f"--{flag}={free_port()}")
    command.append(f"--runtime-env-agent-port={free_port()}")
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115 - open for the head's lifetime
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=RAY_ENV, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while _ray(["job", "list", "--address", address], check=False).returncode != 0:
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not answer within 120 s"
            time.sleep(2)
        yield RayHead(jobs=address, gcs=f"127.0.0.1:{port}", pid=head.pid)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            # `ray start --block` takes longer than 10 s to stop on SIGTERM; the test's cluster holds nothing
            # to keep, so the whole group is killed after a moment.
            head.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([RAY, *args], cwd=REPO, env=RAY_ENV, capture_output=True, text=True, timeout=300)
    assert not check or result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def _submit(address: str, job_id: str, pipeline: Path, root: Path) -> None:
    command = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait", "--working-dir", "."]
    command += ["--runtime-env", "jobs/runtime_env.yaml", "--", sys.executable, "jobs/pipeline.py", str(pipeline)]
    command += ["--root", str(root)]
    deadline = time.monotonic() + 240
    # A fresh head answers `ray job list` a little before its job agent takes submissions.
    while (result := _ray(command, check=False)).returncode != 0 and time.monotonic() < deadline:
        assert "No available agent" in result.stdout + result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _status(address: str, job_id: str) -> str:
    """The job's state as `ray job status` words it: RUNNING, PENDING, SUCCEEDED, FAILED or STOPPED."""
    result = _ray(["job", "status", "--address", address, job_id])
    for line in (result.stderr + result.stdout).splitlines():
        if found := re.search(rf"Status for job '{job_id}': (\w+)|Job '{job_id}' (\w+)\b", line):
            return (found.group(1) or found.group(2)).upper()
    raise AssertionError(f"no status for {job_id} in: {result.stderr[-1000:]}")


def _wait_for(predicate, what: str, timeout: float, every: float = 1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _job_ended(address: str, job_id: str, run_dir: Path):
    """A predicate: the job has SUCCEEDED or FAILED. `ray job status` starts a Python process, which on two
    cores takes time from the job itself, so it is asked every 10 s, or at once when run.json shows the
    run's last stage done or any stage failed (a cheap file read every second)."""
    asked = [time.monotonic()]

    def ended() -> bool:
        states = _stages(run_dir)
        settled = states.get("evaluate", {}).get("state") == "done"
        settled = settled or any(entry.get("state") == "failed" for entry in states.values())
        if not settled and time.monotonic() - asked[0] < 10:
            return False
        asked[0] = time.monotonic()
        return _status(address, job_id) in ("SUCCEEDED", "FAILED")

    return ended


def _stages(run_dir: Path) -> dict:
    """run.json's record of each stage ({} before the run has written it)."""
    run_json = run_dir / "run.json"
    return json.loads(run_json.read_text())["stages"] if run_json.exists() else {}


def _stage_state(run_dir: Path, stage: str) -> str | None:
    return _stages(run_dir).get(stage, {}).get("state")


@pytest.mark.slow
def test_pipeline_job_killed_then_resubmitted_resumes_to_succeeded(ray_head, tmp_path, tiny_gemma):
    jobs = ray_head.jobs
    # The built-in teacher writes the training set; the student is the tiny random-weight Gemma 3, since
    # this test is about the job's machinery (the built-in student's stages have their own tests).
    pipeline = write_smoke_pipeline(tmp_path / "inputs", student=str(tiny_gemma))
    root = tmp_path / "root"
    run_dir = root / "out" / "runs" / "smoke"

    _submit(jobs, "smoke-1", pipeline, root)
    _wait_for(lambda: _stage_state(run_dir, "train") == "running", "the train stage to start", 600)
    # The job's driver is the `rebase run` process: kill it as a lost driver or a killed pod would die.
    driver = json.loads((run_dir / "run.json").read_text())["stages"]["train"]["pid"]
    os.kill(driver, signal.SIGKILL)
    _wait_for(lambda: _status(jobs, "smoke-1") == "FAILED", "the killed job to fail", 120, every=2)
    assert [_stage_state(run_dir, s) for s in ("datastore", "retrieve", "transform")] == ["done"] * 3
    assert not (run_dir / "train" / "_SUCCESS").exists()

    _submit(jobs, "smoke-2", pipeline, root)
    _wait_for(_job_ended(jobs, "smoke-2", run_dir), "the second job to finish", 900)
    logs = _ray(["job", "logs", "--address", jobs, "smoke-2"]).stdout
    assert _status(jobs, "smoke-2") == "SUCCEEDED", logs[-3000:]
    for stage in ("datastore", "retrieve", "transform"):
        assert f"[{stage}] finished earlier" in logs
    # The killed stage runs again (resuming if it had written anything) and so does the one after it.
    assert re.search(r"\[train\] (resuming|starting)", logs) and "[train] done after" in logs
    assert "[evaluate] starting" in logs and "[evaluate] done after" in logs
    assert "run smoke: 2 stage(s) run, 3 already done" in logs
    # the run's last line states the student's margin over the best baseline, with its interval
    assert re.search(
        r"run smoke: .*; accuracy student [0-9.]+, base [0-9.]+, base few-shot [0-9.]+, majority "
        r"[0-9.]+; margin [+-][0-9.]+ accuracy over [a-z -]+ \(95% [+-][0-9.]+ to [+-][0-9.]+\)",
        logs,
    )

    # Every stage finished in the run directory under --root, with its stats; rebase status agrees.
    for stage in ("datastore", "retrieve", "transform", "train", "evaluate"):
        assert (run_dir / stage / "_SUCCESS").exists() and (run_dir / stage / "stats.json").exists()
    status = subprocess.run(
        [sys.executable, "-m", "rebase", "status", str(run_dir), "--json"], capture_output=True, text=True, check=True
    )
    rows = json.loads(status.stdout)
    assert [(row["stage"], row["state"]) for row in rows] == [
        (stage, "done") for stage in ("datastore", "retrieve", "transform", "train", "evaluate")
    ]
    evaluated = json.loads((run_dir / "evaluate" / "stats.json").read_text())
    assert sorted(evaluated["roles"].values()) == ["base", "base few-shot", "majority", "student"]
    assert evaluated["examples"] == 4

    # The report of the finished run shows all six plots once a browser has laid them out.
    dom = render(run_dir / "report.html", tmp_path / "browser")
    assert 'data-rendered-plots="6"' in dom
    assert "Student" in dom and "files/numbers" in dom

    # The same pipeline with a serve section: every finished stage is skipped and the student is served
    # until Ctrl-C, on the task's routes too, from a driver that joins the head (no second Ray to start).
    port = free_port()
    serving = write_smoke_pipeline(tmp_path / "inputs", student=str(tiny_gemma), serve={"port": port})
    command = [sys.executable, "-m", "rebase", "run", str(serving), "--root", str(root), "--only", "serve"]
    joining = {**RAY_ENV, "RAY_ADDRESS": ray_head.gcs}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=joining)
    try:
        _wait_for(lambda: (run_dir / "serve" / "stats.json").exists() or server.poll() is not None, "serving", 300)
        assert server.poll() is None, server.stdout.read()[-3000:]
        url = json.loads((run_dir / "serve" / "stats.json").read_text())["url"]
        assert url == f"http://127.0.0.1:{port}/v1"
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/tasks/parity/v1", api_key="unused")
        answer = client.completions.create(model="train", prompt="Is 12 even?", max_tokens=4, temperature=0)
        assert answer.model == "train" and answer.choices[0].finish_reason in ("stop", "length")
        # The task route put the raw input in the student's prompt format, instruction included.
        assert answer.usage.prompt_tokens > 20
        # The head as the README starts it on one machine listens on loopback only, jobs and Serve included,
        # but for Ray's one exception (README, "Where Ray listens"): Serve replicas' token-guarded gRPC server.
        sockets = listening(ray_head.pid)
        assert {"gcs_server", "raylet"} <= set(sockets.values()) and f"127.0.0.1:{port}" in sockets, sockets
        beyond = {address: name for address, name in sockets.items() if not is_loopback(address)}
        assert all(name.startswith("ray::ServeReplica:") for name in beyond.values()), beyond
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=120)
    assert server.returncode == 0, output[-3000:]
    assert "rebase: stopped serving" in output
