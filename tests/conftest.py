"""Shared fixtures: one local Ray per test session (joined by `rebase` subprocesses through RAY_ADDRESS),
a tiny random-weight Gemma 3 for machinery tests, a student trained once, small generated source files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_address() -> str:
    """The session's one local Ray, started here on first use (in-process stages join it too); its address."""
    import ray

    from rebase.ray_setup import ensure_ray

    ensure_ray()
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def rebase_env(ray_address) -> dict[str, str]:
    """The environment for a `rebase` subprocess that joins the session's Ray instead of starting its own
    (rebase/ray_setup.py joins RAY_ADDRESS). Ray's workers keep the session's environment, not this one."""
    return {**os.environ, "RAY_ADDRESS": ray_address}


def run_rebase(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m rebase ARGS` to the end, output captured."""
    command = [sys.executable, "-m", "rebase", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    """A Gemma 3 causal LM of the built-in's architecture and tokenizer (real vocabulary, special tokens
    and generation config) with random weights, seeded: 4 layers of width 64, three of them sliding-window
    layers with a 32-token window, so prompts outrun the window. For machinery tests, where what the model
    says does not matter; it loads and decodes many times faster than the built-in."""
    import torch
    from transformers import AutoConfig, Gemma3ForCausalLM, GenerationConfig

    from rebase.models import resolve_model

    builtin = resolve_model("builtin:gemma3-270m")
    directory = tmp_path_factory.mktemp("models") / "tiny-gemma3"
    config = AutoConfig.from_pretrained(builtin)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 32,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        }
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(builtin)
    model.save_pretrained(directory)
    for path in builtin.iterdir():  # the tokenizer's files, a chat template if the built-in has one
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, directory / path.name)
    return directory


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")


@pytest.fixture
def source_files(tmp_path):
    """Three small datasets in three formats, with a nested field, a class label and a malformed line."""
    data = tmp_path / "data"
    data.mkdir()
    qa = [
        {"question": f"Which planet is number {i} from the sun?", "answer": f"planet {i}", "meta": {"level": i % 3}}
        for i in range(40)
    ]
    write_jsonl(data / "qa.jsonl", qa, extra_lines=["{not json"])
    (data / "qa.jsonl.description.txt").write_text("Questions about planets and their order from the sun.")
    with open(data / "reviews.csv", "w") as handle:
        handle.write("review,stars\n")
        for i in range(30):
            handle.write(f'"The film number {i} was {"great" if i % 2 else "dull"}",{i % 5}\n')
    labels = ["entailment", "neutral", "contradiction"]
    table = pa.table(
        {
            "premise": [f"A person walks a dog in park {i}." for i in range(60)],
            "hypothesis": [f"Someone is outside, case {i}." for i in range(60)],
            "label": [i % 3 for i in range(60)],
        }
    )
    features = {
        "premise": {"dtype": "string", "_type": "Value"},
        "hypothesis": {"dtype": "string", "_type": "Value"},
        "label": {"names": labels, "_type": "ClassLabel"},
    }
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), data / "nli.parquet")
    return data


def navigate_examples(count: int, start: int = 0) -> list[dict]:
    """Small navigate-style examples with chain-of-thought outputs: take a steps, turn around, take b."""
    examples = []
    for n in range(start, start + count):
        a, b = n % 5 + 1, (n // 5) % 5 + 1  # 25 distinct inputs
        end = a - b
        same = "Yes" if end == 0 else "No"
        reasoning = (
            f"We start at (0, 0). Take {a} steps: (0, {a}). Turn around. Take {b} steps: (0, {end}). "
            f"Since (0, {end}) {'is' if end == 0 else 'is not'} (0, 0), we are "
            f"{'back where we started' if end == 0 else 'not where we started'}. So the answer is {same}."
        )
        examples.append({"input": f"Take {a} steps. Turn around. Take {b} steps.", "output": reasoning})
    return examples


@pytest.fixture(scope="session")
def training_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("training") / "examples.jsonl"
    write_jsonl(path, navigate_examples(16))
    return path


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory, training_file):
    """A student trained once per session on the real built-in model under real Ray Train + DeepSpeed:
    16 examples, 1 epoch of 2-example batches (8 steps), LoRA."""
    from rebase.config import TrainConfig
    from rebase.train import train

    out = tmp_path_factory.mktemp("student") / "student"
    config = TrainConfig(
        data=training_file,
        task="jobs/tasks/navigate.yaml",
        out=out,
        epochs=1,
        batch_size=2,
        learning_rate=1e-3,
        max_length=160,
    )
    return config, train(config)
