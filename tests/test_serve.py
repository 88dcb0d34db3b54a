"""`rebase serve` (the protocol's pure functions: tests/test_serve_openai.py): the application build_app
makes, then the real Ray Serve app on a loopback port called with the official OpenAI SDK (completions,
chat, streaming, the task route), the API key, a sweep of malformed and hostile requests, and concurrent
requests decoded in shared batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from openai_server import free_port
from processes import is_loopback, listening

from rebase.config import ServeConfig

KEY = "test-key-123"


def test_build_app_scales_and_names_the_deployment():
    from rebase.serve import build_app, served_name

    fixed = build_app({"model": "builtin:gemma3-270m", "task": "jobs/tasks/navigate.yaml", "name": "student"})
    deployment = fixed._bound_deployment
    assert deployment.name == "StudentServer" and deployment.num_replicas == 1
    assert deployment.max_ongoing_requests == 64 and deployment.ray_actor_options["num_cpus"] == 1
    config, [student], [group] = deployment.init_args
    assert config.name == "student" and student.name == "student" and student.model == "builtin:gemma3-270m"
    assert student.task.name == "navigate" and group.model == "builtin:gemma3-270m" and group.students == ["student"]
    scaled = build_app(ServeConfig(model="builtin:gemma3-270m", min_replicas=1, max_replicas=3))._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 8.0)
    assert served_name(ServeConfig(model="builtin:gemma3-270m")) == "builtin:gemma3-270m"
    assert ServeConfig(model="builtin:gemma3-270m").model == ["builtin:gemma3-270m"]  # one model, or a list
    assert served_name(ServeConfig(model=str(Path("jobs/tasks").resolve()))) == "tasks"  # a directory: its name


@pytest.fixture(scope="module")
def served():
    """The app on real Ray Serve, loopback, a free port, the built-in model as the student, a key."""
    from ray import serve

    from rebase.ray_setup import ensure_ray
    from rebase.serve import build_app

    os.environ["REBASE_TEST_KEY"] = KEY
    config = ServeConfig(
        model="builtin:gemma3-270m",
        task="jobs/tasks/navigate.yaml",
        name="student",
        api_key_env="REBASE_TEST_KEY",
        port=free_port(),
        threads=2,
        max_batch_size=8,
        batch_wait_timeout_s=0.2,
        max_tokens_limit=64,
        max_body_bytes=4096,
        max_prompt_tokens=256,
        max_choices=4,
    )
    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    serve.run(build_app(config), name="rebase", route_prefix="/")
    yield f"http://127.0.0.1:{config.port}"
    serve.shutdown()
    del os.environ["REBASE_TEST_KEY"]


def _client(url: str, key: str | None = KEY, task: str | None = None):
    from openai import OpenAI

    base = f"{url}/tasks/{task}/v1" if task else f"{url}/v1"
    return OpenAI(base_url=base, api_key=key or "none", max_retries=0)


@pytest.mark.slow
def test_the_openai_sdk_talks_to_the_student(served):
    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["student"]
    done = client.completions.create(model="student", prompt="The capital of France is", max_tokens=8)
    assert done.choices[0].text.strip() and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens == 6 and 0 < done.usage.completion_tokens <= 8
    two = client.completions.create(model="student", prompt=["One, two,", "A, B,"], max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1]
    chat = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content

    pieces = [
        c.choices[0].text
        for c in client.completions.create(model="student", prompt="One, two, three,", max_tokens=12, stream=True)
    ]
    greedy = client.completions.create(model="student", prompt="One, two, three,", max_tokens=12)
    assert len(pieces) > 3 and "".join(pieces) == greedy.choices[0].text  # streamed as it came, same text
    deltas = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(
            model="student", messages=[{"role": "user", "content": "Count: one, two,"}], max_tokens=8, stream=True
        )
    ]
    assert len([d for d in deltas if d]) > 2

    task = _client(served, task="navigate")
    assert [m.id for m in task.models.list().data] == ["student"]
    answer = task.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "Take 1 step. Turn around. Take 1 step."}], max_tokens=48
    )
    assert "###" not in answer.choices[0].message.content  # the task's format is the server's, stop included
    raw = task.completions.create(model="student", prompt="Take 2 steps. Take 2 steps.", max_tokens=16)
    assert raw.usage.prompt_tokens > 30  # the raw input was put in the task's prompt format


@pytest.mark.slow
def test_the_key_guards_every_route_but_health(served):
    import openai

    for key in (None, "wrong"):
        with pytest.raises(openai.AuthenticationError):
            _client(served, key=key).completions.create(model="student", prompt="x", max_tokens=1)
    assert requests.get(f"{served}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{served}/healthz", timeout=10).json() == {"status": "ok"}


@pytest.mark.slow
def test_bad_requests_get_4xx_and_leave_the_server_healthy(served):
    good = {"model": "student", "prompt": "hi", "max_tokens": 2}
    hi = [{"role": "user", "content": "hi"}]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    completions, chat = f"{served}/v1/completions", f"{served}/v1/chat/completions"
    cases = [
        ("malformed JSON", completions, b'{"model": "student", "prompt": ', 400),
        ("a JSON array", completions, b"[]", 400),
        ("a JSON string", completions, b'"hi"', 400),
        ("empty body", completions, b"", 400),
        ("not UTF-8", completions, b"\xff\xfe\xfa", 400),
        ("no model", completions, {"prompt": "hi"}, 400),
        ("no prompt", completions, {"model": "student"}, 400),
        ("prompt of wrong type", completions, {**good, "prompt": 5}, 400),
        ("empty prompt list", completions, {**good, "prompt": []}, 400),
        ("max_tokens as text", completions, {**good, "max_tokens": "2"}, 400),
        ("max_tokens zero", completions, {**good, "max_tokens": 0}, 400),
        ("max_tokens over the limit", completions, {**good, "max_tokens": 100000}, 400),
        ("n over the limit", completions, {**good, "n": 50}, 400),
        ("negative temperature", completions, {**good, "temperature": -1}, 400),
        ("temperature as text", completions, {**good, "temperature": "hot"}, 400),
        ("unsupported top_p", completions, {**good, "top_p": 0.5}, 400),
        ("unknown field", completions, {**good, "best_of": 3}, 400),
        ("code in an unknown field", completions, {**good, "__class__": "os.system"}, 400),
        ("too many stop strings", completions, {**good, "stop": ["a", "b", "c", "d", "e"]}, 400),
        ("stop of wrong type", completions, {**good, "stop": 3}, 400),
        ("stream as text", completions, {**good, "stream": "yes"}, 400),
        ("a model path", completions, {**good, "model": "/etc/passwd"}, 404),
        ("another model", completions, {**good, "model": "gpt-4"}, 404),
        ("prompt over the token limit", completions, {**good, "prompt": "word " * 400}, 400),
        ("body over the size limit", completions, {**good, "prompt": "x" * 10000}, 413),
        (
            "JSON nested 1,800 deep",
            completions,
            b'{"model": "student", "prompt": ' + b"[" * 1800 + b"]" * 1800 + b"}",
            400,
        ),
        ("a lone surrogate", completions, b'{"model": "student", "prompt": "hi \\ud800", "max_tokens": 2}', 400),
        ("no messages", chat, {"model": "student", "messages": []}, 400),
        ("unknown role", chat, {"model": "student", "messages": [{"role": "root", "content": "x"}]}, 400),
        ("message without content", chat, {"model": "student", "messages": [{"role": "user"}]}, 400),
        ("content of wrong type", chat, {"model": "student", "messages": [{"role": "user", "content": 1}]}, 400),
        ("unknown task route", f"{served}/tasks/other/v1/completions", good, 404),
        ("unknown task's chat", f"{served}/tasks/x/v1/chat/completions", {"model": "student", "messages": hi}, 404),
    ]
    for what, url, body, status in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = requests.post(url, data=data, headers=auth, timeout=60)
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], what
    huge = requests.post(completions, data=json.dumps(good), headers={**auth, "X-Big": "a" * 40_000}, timeout=60)
    assert huge.status_code == 431 and "headers are larger than 32768 bytes" in huge.json()["error"]["message"]
    assert requests.get(completions, headers=auth, timeout=10).status_code == 405
    assert requests.get(f"{served}/v1/nothing", headers=auth, timeout=10).json()["error"]["code"] == 404
    assert len(cases) >= 20
    assert requests.get(f"{served}/healthz", timeout=10).status_code == 200
    assert requests.post(completions, data=json.dumps(good), headers=auth, timeout=60).status_code == 200


@pytest.mark.slow
def test_concurrent_requests_share_batches(served):
    from ray import serve

    handle = serve.get_deployment_handle("StudentServer", app_name="rebase")
    before = handle.batches.remote().result()
    client = _client(served)
    results: list = []

    def ask(n: int) -> None:
        results.append(client.completions.create(model="student", prompt=f"Number {n} is", max_tokens=6))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    sizes = handle.batches.remote().result()[len(before) :]
    assert sum(sizes) == 8 and max(sizes) >= 4, sizes  # eight requests, decoded in a few shared batches


LONG = {"model": "student", "prompt": "Once upon a time, in a land far away, there lived", "max_tokens": 64}


@pytest.mark.slow
def test_a_short_request_is_not_held_behind_a_long_one_and_a_gone_client_stops_decoding(served):
    """Seen in a probe: a 4-token request sent 3 s after a 600-token one took 43.9 s, and requests whose
    clients disconnected kept decoding. Now batches decode side by side and a gone client's choice stops."""
    from ray import serve

    handle = serve.get_deployment_handle("StudentServer", app_name="rebase")
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{served}/v1/completions"
    timings: dict[str, float] = {}

    def long_request() -> None:
        started = time.monotonic()
        response = requests.post(url, json=LONG, headers=auth, timeout=120)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 48
        timings["long"] = time.monotonic() - started

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)  # the long request is decoding
    started = time.monotonic()
    short = requests.post(url, json={**LONG, "prompt": "Yes or no?", "max_tokens": 2}, headers=auth, timeout=120)
    timings["short"] = time.monotonic() - started
    thread.join()
    assert short.status_code == 200
    assert timings["short"] < 0.4 * timings["long"], timings  # it did not wait for the long batch to end

    before = handle.cancellations.remote().result()
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and disconnects
        requests.post(url, json=LONG, headers=auth, timeout=1.0)
    deadline = time.monotonic() + 30
    while handle.cancellations.remote().result() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle.cancellations.remote().result() == before + 1


@pytest.mark.slow
def test_rebase_serve_runs_until_ctrl_c_and_listens_on_loopback_only(tiny_gemma):
    """The command end to end with a Ray of its own (the session's serves the module's app), the tiny model.
    Every socket of it and its Ray (GCS, raylet, workers, Serve's proxy, controller and replica, dashboard,
    agents, metrics) is on loopback."""
    port = free_port()
    command = [sys.executable, "-m", "rebase", "serve", "--model", str(tiny_gemma), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert f"at http://127.0.0.1:{port}/v1" in line, line
        response = requests.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny-gemma3", "prompt": "Hello", "max_tokens": 2},  # served as its directory's name
            timeout=120,
        )
        body = response.json()
        assert response.status_code == 200 and body["model"] == "tiny-gemma3"
        assert 1 <= body["usage"]["completion_tokens"] <= 2 and body["usage"]["prompt_tokens"] == 2
        sockets = listening(process.pid)
        held_by = set(sockets.values())
        assert {"gcs_server", "raylet"} <= held_by and any(name.startswith("ray::") for name in held_by), sockets
        assert f"127.0.0.1:{port}" in sockets, sockets
        # The one exception, Ray's own (README, "Where Ray listens"): each Serve replica's inter-deployment gRPC
        # server, bound to every interface by Ray itself; it answers nothing without the cluster's token.
        beyond = {address: name for address, name in sockets.items() if not is_loopback(address)}
        assert all(name.startswith("ray::ServeReplica:") for name in beyond.values()), beyond
        for address in beyond:
            assert grpc_refuses_without_token(int(address.rsplit(":", 1)[1]))
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
        assert "stopped serving" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(1)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def grpc_refuses_without_token(port: int) -> bool:
    """Whether the Serve replica's gRPC server on `port` refuses a call of its service made without Ray's token."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest", lambda x: x, lambda x: x)
        try:
            call(b"", timeout=30)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_a_model_that_cannot_be_found_is_one_line(tmp_path, capsys):
    from rebase.cli import main

    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("rebase: error:") and "not a model directory" in error and "\n" not in error


@pytest.mark.slow
def test_the_vllm_engine_without_vllm_is_one_line(capsys):
    import importlib.util

    from rebase.cli import main

    if importlib.util.find_spec("vllm"):
        pytest.skip("vLLM is installed here")
    assert main(["serve", "--model", "builtin:gemma3-270m", "--engine", "vllm"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after Ray's own start-up notice
    assert error.startswith("rebase: error: engine vllm needs Ray Serve LLM with vLLM")


@pytest.mark.slow
def test_the_serve_config_file_builds_the_same_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rebase.serve import build_app

    config = yaml.safe_load(Path("jobs/serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` and a RayService accept
    [application] = schema.applications
    assert application.import_path == "rebase.serve:build_app"
    assert type(build_app(application.args)).__name__ == "Application"
