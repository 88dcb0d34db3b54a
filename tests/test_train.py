"""`rebase train`: the training set, encoding with the loss on the response only, and real Ray Train +
DeepSpeed runs of the built-in student (one worker, two workers with ZeRO-2, killed and resumed)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rebase.cli import main
from rebase.config import TrainConfig
from rebase.errors import RebaseError
from rebase.train import (
    IGNORE_INDEX,
    LoopState,
    LoraSettings,
    Placement,
    collate,
    encode_example,
    loop_settings,
    read_training_set,
    response_loss,
    train,
)


def test_reads_ok_records_of_a_transformed_directory(tmp_path):
    records = [
        {"input": "a", "output": "A", "status": "ok"},
        {"input": "b", "output": "B", "status": "rejected"},
        {"input": "c", "output": "C", "status": "ok"},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "records.parquet")
    assert read_training_set(tmp_path) == [{"input": "a", "output": "A"}, {"input": "c", "output": "C"}]


def test_an_all_rejected_training_set_is_one_clear_error(tmp_path):
    records = [{"input": "b", "output": "B", "status": "rejected"}, {"input": "d", "output": None, "status": "failed"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "records.parquet")
    with pytest.raises(
        RebaseError,
        match=r"has no ok records to train on \(1 failed, 1 rejected; reasons in its records.parquet and "
        r"report\); a stronger teacher",
    ):
        read_training_set(tmp_path)
    with pytest.raises(RebaseError, match="not a transformed directory"):
        read_training_set(tmp_path / "..")


def test_plain_files_of_input_and_output(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"input": "q", "output": "a"}) + "\n\n")
    (tmp_path / "d.csv").write_text("input,output\nq,a\n , empty\n")
    pq.write_table(pa.table({"input": ["q"], "output": ["a"]}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert read_training_set(tmp_path / name) == [{"input": "q", "output": "a"}]
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(RebaseError, match="every row needs 'input' and 'output'"):
        read_training_set(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(RebaseError, match="cannot read training data"):
        read_training_set(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RebaseError, match="no examples"):
        read_training_set(tmp_path / "empty.jsonl")
    (tmp_path / "d.txt").write_text("q a")
    with pytest.raises(RebaseError, match="must be a transformed directory"):
        read_training_set(tmp_path / "d.txt")
    with pytest.raises(RebaseError, match="not found"):
        read_training_set(tmp_path / "missing.jsonl")

    # Seen in a probe: numbers were turned into text silently. A CSV keeps each cell as written; a JSON
    # number is refused with the row that holds it.
    (tmp_path / "numbers.csv").write_text("input,output\nWhat is 3 + 4?,007\n")
    assert read_training_set(tmp_path / "numbers.csv") == [{"input": "What is 3 + 4?", "output": "007"}]
    (tmp_path / "numbers.jsonl").write_text(
        json.dumps({"input": "q", "output": "a"}) + "\n" + '{"input": "3+4", "output": 7}\n'
    )
    with pytest.raises(RebaseError, match=r"numbers.jsonl: row 2: 'output' is int 7, not text; write it as a string"):
        read_training_set(tmp_path / "numbers.jsonl")


def test_collate_pads_right_masks_padding_and_takes_read_only_arrays():
    import warnings

    first, second = np.array([5, 6, 7], dtype=np.int64), np.array([8], dtype=np.int64)
    first.flags.writeable = second.flags.writeable = False  # as Ray Data hands them over
    batch = {
        "input_ids": np.array([first, second], dtype=object),
        "labels": np.array([np.array([IGNORE_INDEX, 6, 7]), np.array([8])], dtype=object),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = collate(batch, pad_id=0)
    assert tensors["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert tensors["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tensors["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert {str(t.dtype) for t in tensors.values()} == {"torch.int64"}


def test_loop_settings_schedule_and_learning_rate(tmp_path):
    config = TrainConfig(data=tmp_path, task=tmp_path, out=tmp_path, epochs=3, batch_size=4, workers=2)
    placement = Placement(use_gpu=False, cpus=1, threads=1)
    # 21 examples over 2 workers: 10 each, 3 batches of at most 4 per epoch, 9 steps; warm-up 5% of 9 -> 0
    settings = loop_settings(config, tmp_path / "model", 0, 21, placement)
    assert (settings.total_steps, settings.warmup_steps, settings.learning_rate) == (9, 0, 2e-4)
    assert settings.lora == LoraSettings(rank=16, alpha=32, dropout=0.05, target_modules="all-linear")
    assert settings.method == "LoRA r=16"
    accumulated = config.model_copy(update={"gradient_accumulation": 2, "max_steps": 3, "full": True})
    full = loop_settings(accumulated, tmp_path / "model", 0, 21, placement)
    assert (full.total_steps, full.learning_rate, full.lora, full.method) == (3, 2e-5, None, "full fine-tuning")
    chosen = loop_settings(config.model_copy(update={"learning_rate": 1e-3}), tmp_path, 0, 21, placement)
    assert chosen.learning_rate == 1e-3
    assert pickle.loads(pickle.dumps(settings)) == settings  # travels to the Ray Train workers


def test_loop_state_records_the_resume_step_only_when_resumed():
    state = LoopState(step=2, epoch=1, losses=[[1, 2.5], [2, 2.0]], tokens=90, seconds=1.5)
    assert json.loads(state.to_json()) == {
        "step": 2, "epoch": 1, "batches_done": 0, "losses": [[1, 2.5], [2, 2.0]], "tokens": 90, "seconds": 1.5
    }  # fmt: skip
    state.resumed_from_step = 2
    assert LoopState(**json.loads(state.to_json())) == state


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rebase.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:gemma3-270m"))


@pytest.mark.slow  # the built-in's tokenizer: converted from the GGUF on a fresh machine (about a minute)
def test_loss_only_on_the_response_and_its_end(tokenizer):
    prompt, response = "### Input:\nIs ice cold?\n\n### Response:\n", "Yes"
    encoded = encode_example(tokenizer, prompt, response, max_length=64)
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert not encoded.truncated


@pytest.mark.slow
def test_truncation_cuts_the_response_and_is_reported(tokenizer):
    prompt = "Say a long thing:"
    response = "one two three four five six seven eight nine ten"
    length = len(tokenizer(prompt)["input_ids"])
    cut = encode_example(tokenizer, prompt, response, max_length=length + 3)
    assert cut.truncated and len(cut.input_ids) == length + 3
    assert cut.labels[:length] == [IGNORE_INDEX] * length and IGNORE_INDEX not in cut.labels[length:]
    assert encode_example(tokenizer, prompt, response, max_length=length) is None


@pytest.mark.slow
def test_response_loss_equals_the_models_own_loss(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from rebase.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:gemma3-270m"), dtype=torch.float32)
    long = encode_example(tokenizer, "### Input:\nhello there my friend\n\n### Response:\n", "Yes it is", 64)
    short = encode_example(tokenizer, "### Input:\nhi\n\n### Response:\n", "No, it is not so at all", 64)
    batch = collate(
        {
            "input_ids": np.array([long.input_ids, short.input_ids], dtype=object),
            "labels": np.array([long.labels, short.labels], dtype=object),
        },
        pad_id=tokenizer.pad_token_id,
    )
    assert batch["attention_mask"].sum() == len(long.input_ids) + len(short.input_ids)
    with torch.no_grad():
        ours, theirs = response_loss(model, batch), model(**batch).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4)


@pytest.mark.slow
def test_training_lowers_the_loss_and_exports_a_plain_model(trained_student):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rebase.models import resolve_model
    from rebase.task import load_task, student_prompt

    config, summary = trained_student
    assert summary.examples == 16 and summary.steps == 8 and len(summary.losses) == 8
    assert summary.final_loss < 0.5 * summary.first_loss
    assert summary.train_tokens > 16 * 40 and summary.tokens_per_second > 0
    out = config.out
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        trained_q = weights.get_tensor(next(n for n in names if n.endswith("layers.0.self_attn.q_proj.weight")))
    assert not any("lora" in name for name in names)  # merged: plain transformers loads it, no peft needed
    with safe_open(resolve_model("builtin:gemma3-270m") / "model.safetensors", "pt") as weights:
        base_q = weights.get_tensor(next(n for n in weights.keys() if n.endswith("layers.0.self_attn.q_proj.weight")))  # noqa: SIM118
    assert not torch.equal(trained_q, base_q)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = student_prompt(load_task(config.task), "Take 2 steps. Turn around. Take 2 steps.")
    ids = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).startswith("We start")
    card = (out / "README.md").read_text()
    assert "base_model: builtin:gemma3-270m" in card and "LoRA r=16" in card and "### Response:" in card
    stats = json.loads((out / "stats.json").read_text())
    assert stats["summary"]["steps"] == 8 and stats["lineage"]["data"] == str(config.data)
    assert (out / "_SUCCESS").exists()
    # the unmerged adapter is kept: over its base it gives the merged student's logits
    assert stats["base"] == "builtin:gemma3-270m" and stats["adapter"] == "adapter"
    assert load_task(out / "task.yaml") == load_task(config.task)
    from peft import PeftModel

    from rebase.models import building_peft_model

    with torch.inference_mode(), building_peft_model():
        base = AutoModelForCausalLM.from_pretrained(resolve_model(stats["base"]), dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, out / "adapter")(**ids).logits
        merged = model(**ids).logits
    assert torch.allclose(adapted, merged, atol=1e-3)

    again = train(config)
    assert again.already_done and "already trained" in again.line()
    with pytest.raises(RebaseError, match="holds a rebase student made from other inputs or settings"):
        train(config.model_copy(update={"epochs": 3}))


def test_bad_training_input_is_one_line(training_file, tmp_path, capsys, monkeypatch):
    base = ["train", "--data", str(training_file), "--task", "jobs/tasks/navigate.yaml", "--out"]
    cases = [
        (base + [str(tmp_path / "a"), "--zero-stage", "5"], "field 'zero_stage'"),
        (base + [str(tmp_path / "b"), "--student", str(tmp_path / "nowhere")], "is not a model directory"),
        (base + [str(tmp_path / "c"), "--student", "acme/not-cached-model"], "not in the local Hugging Face cache"),
        (
            ["train", "--data", str(tmp_path / "missing.jsonl"), "--task", "jobs/tasks/navigate.yaml", "--out", "x"],
            "training data not found",
        ),
        (["train", "--task", "jobs/tasks/navigate.yaml"], "train needs --data"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, message in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("rebase: error:") and message in error and len(error.splitlines()) == 1, error
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert main(base + [str(tmp_path / "foreign")]) == 2
    assert "is not empty and is not a rebase student; choose another" in capsys.readouterr().err
    for name in "abc":
        assert not (tmp_path / name).exists()  # a refused run leaves nothing behind


@pytest.mark.slow
def test_more_workers_than_cpus_is_refused(training_file, tmp_path, capsys):
    argv = ["train", "--data", str(training_file), "--task", "jobs/tasks/navigate.yaml"]
    argv += ["--out", str(tmp_path / "s"), "--workers", "64"]
    assert main(argv) == 2
    assert "64 worker(s) x 1 CPU(s) do not fit this Ray's" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_lineage_follows_the_transform_back_to_the_datastore(tmp_path):
    from rebase.train import lineage

    datastore, retrieved, transformed = tmp_path / "ds", tmp_path / "ret", tmp_path / "tr"
    for directory in (datastore, retrieved, transformed):
        directory.mkdir()
    manifest = {"embedder": {"name": "builtin:minilm"}, "sources": [{"spec": "bigbench"}], "updated": "today"}
    (datastore / "manifest.json").write_text(json.dumps(manifest))
    (retrieved / "stats.json").write_text(json.dumps({"datastore": str(datastore), "top_k": 3000, "ban": ["x"]}))
    stats = {"teacher": "builtin:gemma3-270m", "engine": "transformers", "rows": 9, "retrieved": str(retrieved)}
    (transformed / "stats.json").write_text(json.dumps(stats))
    found = lineage(transformed)
    assert found["transformed"]["teacher"] == "builtin:gemma3-270m"
    assert found["retrieved"]["top_k"] == 3000
    assert found["datastore"] == {
        "path": str(datastore),
        "embedder": {"name": "builtin:minilm"},
        "sources": ["bigbench"],
        "updated": "today",
    }
    assert lineage(tmp_path / "file.jsonl") == {"data": str(tmp_path / "file.jsonl")}


@pytest.mark.slow
def test_a_lost_worker_restarts_and_a_killed_run_resumes_from_the_last_checkpoint(
    training_file, tmp_path, tiny_gemma, rebase_env
):
    """`rebase train` with data parallelism (2 workers of 1 thread, ZeRO-2: optimizer state and gradients
    sharded). One worker dies after the first checkpoint, as on a lost node: Ray Train restarts the group
    from it, each worker its shard. Then the whole command is killed after a later checkpoint, and running
    it again resumes from that one. Every step is trained once: none lost, none repeated."""
    import signal
    import time

    import psutil

    out = tmp_path / "student"
    command = [sys.executable, "-m", "rebase", "train", "--data", str(training_file), "--task"]
    command += ["jobs/tasks/navigate.yaml", "--out", str(out), "--student", str(tiny_gemma)]
    command += ["--workers", "2", "--zero-stage", "2", "--threads", "1", "--epochs", "2", "--batch-size", "2"]
    command += ["--checkpoint-every", "2", "--max-length", "160"]
    storage = out / "checkpoints" / "train"

    def checkpointed() -> set[int]:  # the steps of the checkpoints reported and recorded so far
        if not (storage / "checkpoint_manager_snapshot.json").exists():
            return set()
        steps = set()
        for state in storage.glob("checkpoint_*/state.json"):
            with contextlib.suppress(ValueError):  # still being written
                steps.add(json.loads(state.read_text())["step"])
        return steps

    def recorded() -> int | None:  # the step of the latest checkpoint Ray Train has recorded (it resumes from it)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):  # none yet, or being written
            snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
            return snapshot["latest_checkpoint_result"]["metrics"]["step"]
        return None

    def wait_for(ready, what: str) -> None:
        deadline = time.monotonic() + 300
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, f"training ended (exit {process.returncode}) before {what}"
        assert ready(), f"no {what} in 300 s"

    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=rebase_env
    )
    try:
        # recorded, not only written: a checkpoint on disk that Ray Train has not recorded yet is not resumed from
        wait_for(lambda: recorded() is not None, "a first checkpoint")
        first = recorded()
        # Ray names a worker process after its actor ("ray::RayTrainWorker..."); the session's Ray was started
        # by this process, so its workers descend from it (another Ray on the machine has workers too)
        workers = []
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a process that ended meanwhile
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    workers.append(child)
        assert len(workers) == 2
        workers[1].kill()
        wait_for(lambda: max(checkpointed()) > first, "a checkpoint after the restart")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    later = max(checkpointed())
    assert not (out / "_SUCCESS").exists() and first < later < 8
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=rebase_env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert "(LoRA r=16, 2 worker(s), ZeRO-2)" in line, line
    assert "8 steps over 2 epoch(s), resumed from step " in line, line
    # from the last checkpoint Ray Train recorded: the later one, or the first where the kill came between
    # writing the later one and recording it
    assert first <= int(line.split("resumed from step ")[1].split(",")[0]) <= later, line
    summary = json.loads((out / "stats.json").read_text())["summary"]
    assert [step for step, _ in summary["losses"]] == list(range(1, 9))
    # each step's figures are summed over both workers: 2 workers x 2 examples of at least 40 tokens
    assert summary["train_tokens"] >= 8 * 2 * 2 * 40
    assert (out / "model.safetensors").exists()
