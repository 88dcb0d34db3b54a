"""Several students behind one `rebase serve` endpoint: students of the tiny Gemma 3 trained by the real
`rebase train` (two LoRA, one full), served from their parent directory on real Ray Serve and called with the
official OpenAI SDK; the LoRA pair shares one base in memory and each student answers as its own merged model
does alone, also in one batch; unknown names and tasks are OpenAI-style 404s; bad combinations are one line."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import navigate_examples, run_rebase, write_jsonl
from openai_server import free_port

from rebase.config import ServeConfig

pytestmark = pytest.mark.slow
PROMPTS = ["Take 2 steps. Turn left.", "Always face forward. Take 1 step left.", "Turn around. Take 3 steps."]


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_gemma, ray_address) -> Path:
    """alpha and beta: LoRA students of the tiny model on different examples and learning rates; gamma: every
    weight fine-tuned. Real Ray Train + DeepSpeed, a few steps each."""
    from rebase.config import TrainConfig
    from rebase.train import train

    root = tmp_path_factory.mktemp("students")
    plans = {
        "alpha": {"learning_rate": 5e-3, "start": 0},
        "beta": {"learning_rate": 2e-2, "start": 8},
        "gamma": {"learning_rate": 1e-3, "start": 16, "full": True},
    }
    for name, plan in plans.items():
        data = root.parent / f"{name}.jsonl"
        write_jsonl(data, navigate_examples(8, start=plan.pop("start")))
        config = TrainConfig(
            data=data,
            task="jobs/tasks/navigate.yaml",
            out=root / name,
            student=str(tiny_gemma),
            epochs=1,
            batch_size=2,
            max_length=160,
            **plan,
        )
        train(config)
    return root


def alone(directory: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions of a model loaded on its own (the merged student), as `/v1/completions` encodes them."""
    from rebase.generate.engines import GenerationParams, TransformersEngine

    engine = TransformersEngine(str(directory), threads=1, dtype="float32")
    ids = [engine.tokenizer(prompt)["input_ids"] for prompt in prompts]
    decoded = engine.batch(ids, [GenerationParams(max_tokens)] * len(ids)).run()
    return [engine.tokenizer.decode(tokens, skip_special_tokens=True) for tokens, _ in decoded]


@pytest.fixture(scope="module")
def served(students):
    """The directory of students on real Ray Serve, loopback, a free port, float32 (as `alone` decodes)."""
    from ray import serve

    from rebase.ray_setup import ensure_ray
    from rebase.serve import build_app

    config = ServeConfig(
        model=str(students), port=free_port(), threads=2, dtype="float32", max_batch_size=8, batch_wait_timeout_s=0.3
    )
    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    serve.run(build_app(config), name="rebase", route_prefix="/")
    yield f"http://127.0.0.1:{config.port}"
    serve.shutdown()


def _client(url: str, task: str | None = None):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/tasks/{task}/v1" if task else f"{url}/v1", api_key="none", max_retries=0)


def test_students_share_a_base_and_each_answers_as_it_does_alone(served, students):
    from ray import serve

    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["alpha", "beta", "gamma"]
    handle = serve.get_deployment_handle("StudentServer", app_name="rebase")
    loaded = handle.loaded.remote().result()
    assert [(m["students"], m["adapters"]) for m in loaded] == [(["alpha", "beta"], ["alpha", "beta"]), (["gamma"], [])]
    stats = json.loads((students / "alpha" / "stats.json").read_text())
    assert stats["base"] == str(Path(stats["config"]["student"]).resolve()) and stats["adapter"] == "adapter"

    expected = {name: alone(students / name, PROMPTS, 10) for name in ("alpha", "beta", "gamma")}
    assert expected["alpha"] != expected["beta"]  # the adapters do differ: a request given the wrong one would show
    asks = [(name, prompt) for prompt in PROMPTS for name in expected]
    before = len(handle.batches.remote().result())
    with ThreadPoolExecutor(len(asks)) as pool:  # all at once: batches that mix the students
        answers = list(
            pool.map(lambda ask: client.completions.create(model=ask[0], prompt=ask[1], max_tokens=10), asks)
        )
    for (name, prompt), answer in zip(asks, answers):
        assert answer.model == name
        assert answer.choices[0].text == expected[name][PROMPTS.index(prompt)], (name, prompt)
    assert max(handle.batches.remote().result()[before:]) > 3  # decoded together, across students

    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "beta" and chat.choices[0].message.role == "assistant"


def test_task_routes_and_unknown_names_are_openai_404s(served):
    import openai

    task = _client(served, task="navigate")
    assert [m.id for m in task.models.list().data] == ["alpha", "beta", "gamma"]
    answer = task.completions.create(model="gamma", prompt="Take 1 step. Take 1 step.", max_tokens=8)
    assert answer.model == "gamma" and answer.usage.prompt_tokens > 30  # put in the task's prompt format
    with pytest.raises(openai.NotFoundError) as unknown:
        _client(served).completions.create(model="delta", prompt="Hi", max_tokens=2)
    error = unknown.value.body
    assert error["type"] == "not_found_error" and error["param"] == "model" and "'delta'" in error["message"]
    with pytest.raises(openai.NotFoundError):
        _client(served, task="squad").models.list()
    with pytest.raises(openai.NotFoundError):  # the chat route too
        _client(served).chat.completions.create(model="../alpha", messages=[{"role": "user", "content": "x"}])


def test_bad_combinations_of_students_are_one_line(students):
    alpha, beta = str(students / "alpha"), str(students / "beta")
    refusals = {
        ("--model", alpha, "--model", beta, "--base", "builtin:gemma3-270m"): "was trained from",
        ("--model", alpha, "--model", alpha): "two students are named 'alpha'",
        ("--model", str(students), "--name", "x"): "--name names one model",
        ("--model", str(students), "--task", "jobs/tasks/navigate.yaml"): "--task is for one model",
        ("--model", str(students.parent)): "neither a model nor a directory of students",
    }
    for args, message in refusals.items():
        done = run_rebase("serve", *args, "--port", str(free_port()), timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (args, done.stderr)
