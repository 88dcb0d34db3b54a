"""`rebase train`: Ray Train + DeepSpeed fine-tune the student on the teacher's examples (LoRA or full).

A recipe read top to bottom: read the training set, encode it (loss on the response only), start a
`TorchTrainer` whose workers each run `_train_loop` (DeepSpeed ZeRO 0-3 over a Ray Data shard), report a
checkpoint every epoch or N steps, then merge the final weights into the student and export a Hugging Face
directory with a model card. The student directory holds:
    config.json, model.safetensors, tokenizer files, generation_config.json   the merged student
    README.md         the model card: task, prompt format, lineage, hyperparameters, loss
    stats.json        the same as data, `_SUCCESS` once exported
    run.json          the run's fingerprint (written first: a re-run with other inputs is refused)
    checkpoints/      Ray Train's storage (unless `storage_path` names another place, e.g. s3://)
A killed run re-run with the same command resumes from its last checkpoint (Ray Train restores the run
from its storage); a lost worker restarts the worker group from it (`FailureConfig`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from rebase.config import TrainConfig
from rebase.errors import RebaseError
from rebase.io import write_json_atomic
from rebase.models import canonical_model_name, resolve_model
from rebase.task import TaskSpec, load_task, student_prompt

IGNORE_INDEX = -100  # labels at this value carry no loss (PyTorch's cross-entropy default)


def read_training_set(path: Path) -> list[dict]:
    """(input, output) pairs from a transformed directory (its `ok` records) or from a jsonl, parquet or
    csv file with `input` and `output` columns (teacher data made elsewhere); one clear error if none."""
    path = Path(path)
    if path.is_dir():
        records = path / "records.parquet"
        if not records.exists():
            raise RebaseError(f"{path} is not a transformed directory (no records.parquet); run rebase transform")
        rows = pq.read_table(records, columns=["input", "output", "status"]).to_pylist()
        pairs = [{"input": r["input"], "output": r["output"]} for r in rows if r["status"] == "ok"]
        if not pairs:
            statuses: dict[str, int] = {}
            for row in rows:
                statuses[row["status"]] = statuses.get(row["status"], 0) + 1
            found = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "no records"
            raise RebaseError(f"{path} has no ok records to train on ({found})")
        return pairs
    if not path.is_file():
        raise RebaseError(f"training data not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        elif suffix == ".csv":
            rows = pa_csv.read_csv(path).to_pylist()
        else:
            raise RebaseError(f"{path}: training data must be a transformed directory, .jsonl, .parquet or .csv")
    except (json.JSONDecodeError, OSError, ValueError) as error:
        raise RebaseError(f"{path}: cannot read training data ({type(error).__name__})") from None
    if rows and not all(isinstance(r, dict) and "input" in r and "output" in r for r in rows):
        raise RebaseError(f"{path}: every row needs 'input' and 'output'")
    pairs = [
        {"input": str(r["input"]), "output": str(r["output"])}
        for r in rows
        if str(r["input"] or "").strip() and str(r["output"] or "").strip()
    ]
    if not pairs:
        raise RebaseError(f"{path} holds no examples with a non-empty input and output")
    return pairs


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> Encoded | None:
    """Token ids of prompt + response + EOS, with labels only on the response and EOS (the student learns
    to answer and to stop, not to repeat prompts). Longer than `max_length`: the response is cut at the
    end (`truncated`); None when not even one response token fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return Encoded(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )


def encode_training_set(
    task: TaskSpec, pairs: list[dict], tokenizer, max_length: int, few_shot: bool = False
) -> tuple[list[dict], int, int]:
    """The examples as token ids in the student's prompt format; how many were cut to `max_length` and how
    many were dropped (their prompt alone fills it)."""
    rows, truncated, dropped = [], 0, 0
    for pair in pairs:
        encoded = encode_example(tokenizer, student_prompt(task, pair["input"], few_shot), pair["output"], max_length)
        if encoded is None:
            dropped += 1
            continue
        truncated += encoded.truncated
        rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return rows, truncated, dropped


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict:
    """A batch of encoded examples as right-padded tensors (padding masked out and carrying no loss)."""
    import torch

    width = max(len(ids) for ids in batch["input_ids"])
    input_ids = torch.full((len(batch["input_ids"]), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, targets) in enumerate(zip(batch["input_ids"], batch["labels"])):
        input_ids[row, : len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels[row, : len(targets)] = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class TrainSummary:
    out: Path
    student: str
    examples: int
    truncated: int
    dropped: int
    steps: int
    epochs: int
    workers: int
    zero_stage: int
    method: str
    first_loss: float | None
    final_loss: float | None
    train_tokens: int
    tokens_per_second: float
    seconds: float
    resumed_from_step: int | None = None
    already_done: bool = False
    losses: list = field(default_factory=list)

    def line(self) -> str:
        if self.already_done:
            return f"{self.out} is already trained ({self.steps} steps, final loss {self.final_loss}); nothing to do"
        resumed = f", resumed from step {self.resumed_from_step}" if self.resumed_from_step else ""
        loss = f"loss {self.first_loss:.3f} -> {self.final_loss:.3f}" if self.final_loss is not None else "no steps"
        return (
            f"trained {self.student} ({self.method}, {self.workers} worker(s), ZeRO-{self.zero_stage}) on "
            f"{self.examples} examples ({self.truncated} truncated, {self.dropped} dropped as too long): "
            f"{self.steps} steps over {self.epochs} epoch(s){resumed}, {loss}, "
            f"{self.tokens_per_second:,.0f} tokens/s; {self.seconds:.0f} s -> {self.out}"
        )


def train(config: TrainConfig) -> TrainSummary:
    """Fine-tune the student on the training set with Ray Train + DeepSpeed and export it; resumable."""
    started = time.monotonic()
    task = load_task(config.task)
    pairs = read_training_set(config.data)
    fingerprint = _fingerprint(task, pairs, config)
    out = Path(config.out).absolute()
    if _check_out(out, fingerprint):
        stats = json.loads((out / "stats.json").read_text())
        return TrainSummary(**{**stats["summary"], "out": out, "already_done": True})
    model_path = resolve_model(config.student)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows, truncated, dropped = encode_training_set(task, pairs, tokenizer, config.max_length, config.few_shot)
    if not rows:
        raise RebaseError(f"no example fits --max-length {config.max_length} (every prompt is longer); raise it")
    placement = _placement(config)
    if len(rows) < config.workers:
        raise RebaseError(f"{len(rows)} examples cannot feed {config.workers} workers; use fewer workers")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "run.json", {"fingerprint": fingerprint, "student": canonical_model_name(config.student)})
    settings = _loop_settings(config, model_path, tokenizer, len(rows), placement)
    print(
        f"train: {len(rows)} examples ({truncated} truncated, {dropped} dropped), {settings['total_steps']} steps "
        f"on {config.workers} worker(s), ZeRO-{config.zero_stage}, {settings['method']}",
        file=sys.stderr,
    )
    checkpoint = _fit(config, settings, rows, placement, out)
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / "state.json").read_text())
        export_student(Path(directory) / "weights", model_path, out, tokenizer, settings)
    summary = TrainSummary(
        out=out,
        student=canonical_model_name(config.student),
        examples=len(rows),
        truncated=truncated,
        dropped=dropped,
        steps=state["step"],
        epochs=state["epoch"],
        workers=config.workers,
        zero_stage=config.zero_stage,
        method=settings["method"],
        first_loss=state["losses"][0][1] if state["losses"] else None,
        final_loss=state["losses"][-1][1] if state["losses"] else None,
        train_tokens=state["tokens"],
        tokens_per_second=state["tokens"] / state["seconds"] if state["seconds"] else 0.0,
        seconds=time.monotonic() - started,
        resumed_from_step=state.get("resumed_from_step"),
        losses=state["losses"],
    )
    stats = {
        "fingerprint": fingerprint,
        "task": task.name,
        "data": str(config.data),
        "config": config.model_dump(mode="json"),
        "lineage": lineage(Path(config.data)),
        "summary": {key: value for key, value in asdict(summary).items() if key not in ("out", "already_done")},
    }
    write_json_atomic(out / "stats.json", stats)
    (out / "README.md").write_text(model_card(task, config, summary, stats["lineage"]))
    (out / "_SUCCESS").write_text("")
    return summary


def _fingerprint(task: TaskSpec, pairs: list[dict], config: TrainConfig) -> str:
    """What makes a student what it is: its data, task, base model and the settings that change the weights."""
    ignored = {"out", "storage_path", "max_failures", "threads", "checkpoint_every", "data", "task"}
    payload = {
        "data": hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest(),
        "task": task.model_dump(mode="json"),
        "student": canonical_model_name(config.student),
        "settings": config.model_dump(mode="json", exclude=ignored),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_out(out: Path, fingerprint: str) -> bool:
    """True when `out` already holds this student; refuses a directory that is something else."""
    if out.exists() and not out.is_dir():
        raise RebaseError(f"--out {out} is a file; choose a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    run = out / "run.json"
    if not run.exists():
        raise RebaseError(f"--out {out} is not empty and is not a rebase student directory; choose another")
    if json.loads(run.read_text()).get("fingerprint") != fingerprint:
        raise RebaseError(
            f"{out} holds a student trained on other data, task, base model or settings; choose another --out"
        )
    return (out / "_SUCCESS").exists()


def _placement(config: TrainConfig) -> dict:
    """CPUs, GPUs and threads per worker; one clear error when the cluster cannot place the workers."""
    from rebase.ray_setup import cluster_gpus, ensure_ray

    ensure_ray()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    gpus = cluster_gpus()
    use_gpu = config.device == "gpu" or (config.device == "auto" and gpus > 0)
    local = not os.environ.get("RAY_ADDRESS")  # a remote cluster may autoscale to what is asked
    if use_gpu and local and gpus < config.workers:
        raise RebaseError(
            f"--device gpu with {config.workers} worker(s) needs {config.workers} GPU(s); this Ray has {gpus:g}"
        )
    threads = config.threads or max(1, cpus // config.workers)
    per_worker = 1 if use_gpu else min(threads, max(1, cpus))
    if local and config.workers * per_worker > cpus:
        raise RebaseError(
            f"{config.workers} worker(s) x {per_worker} CPU(s) do not fit this Ray's {cpus} CPUs; "
            "use fewer --workers or --threads"
        )
    return {"use_gpu": use_gpu, "cpus": per_worker, "threads": None if use_gpu else threads}


def _loop_settings(config: TrainConfig, model_path: Path, tokenizer, examples: int, placement: dict) -> dict:
    """Plain values for the workers' loop (what each needs to build the same model and schedule)."""
    per_worker = examples // config.workers  # Ray Data splits the dataset equally
    batches = math.ceil(per_worker / config.batch_size)
    total = max(1, batches * config.epochs // config.gradient_accumulation)
    if config.max_steps:
        total = min(total, config.max_steps)
    lora = not config.full
    return {
        "model_path": str(model_path),
        "lora": lora,
        "method": f"LoRA r={config.lora_rank}" if lora else "full fine-tuning",
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_target_modules": config.lora_target_modules,
        "learning_rate": config.learning_rate or (2e-4 if lora else 2e-5),
        "weight_decay": config.weight_decay,
        "warmup_steps": int(config.warmup_ratio * total),
        "batch_size": config.batch_size,
        "gradient_accumulation": config.gradient_accumulation,
        "epochs": config.epochs,
        "total_steps": total,
        "checkpoint_every": config.checkpoint_every,
        "zero_stage": config.zero_stage,
        "use_gpu": placement["use_gpu"],
        "threads": placement["threads"],
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "seed": config.seed,
    }


def _fit(config: TrainConfig, settings: dict, rows: list[dict], placement: dict, out: Path):
    """Run the workers under Ray Train; the final checkpoint (weights + state) once they finish."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = config.storage_path or str(out / "checkpoints")
    # Shuffled here, once: the workers may hold every CPU, and Ray Data's shuffle tasks would wait for one.
    rows = list(rows)
    random.Random(config.seed).shuffle(rows)
    dataset = ray.data.from_items(rows)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=settings,
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=placement["use_gpu"],
            resources_per_worker={"CPU": placement["cpus"], **({"GPU": 1} if placement["use_gpu"] else {})},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=storage,
            # A lost worker (or node) restarts the worker group from the last reported checkpoint.
            failure_config=FailureConfig(max_failures=config.max_failures),
            # The latest two: the newest may be half-uploaded when a node dies.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RebaseError(f"training ended without a checkpoint in {storage}; see the log above")
    return result.checkpoint


def _train_loop(settings: dict) -> None:
    """One Ray Train worker: build the student, wrap it in DeepSpeed, train on this worker's shard, report
    checkpoints (every worker saves its ZeRO shard into the same checkpoint)."""
    import deepspeed
    import ray.train
    import torch
    from transformers import get_linear_schedule_with_warmup

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(settings["seed"])
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    model = build_student(settings)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, settings["warmup_steps"], settings["total_steps"])
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(settings)
    )
    state = {"step": 0, "epoch": 0, "batches_done": 0, "losses": [], "tokens": 0, "seconds": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag="deepspeed", load_module_strict=not settings["lora"])
            state = json.loads((Path(directory) / "state.json").read_text())
        state["resumed_from_step"] = state["step"]
    shard = ray.train.get_dataset_shard("train")
    total, every = settings["total_steps"], settings["checkpoint_every"]
    last_print = time.monotonic()
    step_loss, step_batches, step_tokens = 0.0, 0, 0
    for epoch in range(state["epoch"], settings["epochs"]):
        batches = shard.iter_torch_batches(
            batch_size=settings["batch_size"], collate_fn=lambda batch: collate(batch, settings["pad_id"])
        )
        for index, batch in enumerate(batches):
            if state["step"] >= total:
                break
            if index < state["batches_done"]:
                continue  # trained before the checkpoint this run resumed from
            began = time.monotonic()
            batch = {name: tensor.to(engine.device) for name, tensor in batch.items()}
            loss = response_loss(engine, batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates the weights every `gradient_accumulation` micro-batches
            state["batches_done"] = index + 1
            step_loss, step_batches = step_loss + loss.detach().item(), step_batches + 1
            step_tokens += int(batch["attention_mask"].sum())
            state["seconds"] += time.monotonic() - began
            if engine.global_steps == state["step"]:
                continue
            state["step"] = engine.global_steps
            loss_sum, batch_sum, token_sum = _sum_over_workers([step_loss, step_batches, step_tokens], world)
            state["losses"].append([state["step"], round(loss_sum / batch_sum, 4)])
            state["tokens"] += int(token_sum)
            step_loss, step_batches, step_tokens = 0.0, 0, 0
            if rank == 0 and (time.monotonic() - last_print > 10 or state["step"] == total):
                rate = state["tokens"] / max(state["seconds"], 1e-9)
                # Straight to stderr: Ray Train's print patch would log each line twice.
                sys.stderr.write(
                    f"train: epoch {epoch + 1}/{settings['epochs']} step {state['step']}/{total} "
                    f"loss {state['losses'][-1][1]:.4f} ({rate:,.0f} tokens/s)\n"
                )
                sys.stderr.flush()
                last_print = time.monotonic()
            if every and state["step"] % every == 0 and state["step"] < total:
                _report(engine, state, settings, rank, final=False)
        state["epoch"], state["batches_done"] = epoch + 1, 0
        if state["step"] >= total:
            break
        if not every and epoch + 1 < settings["epochs"]:
            _report(engine, state, settings, rank, final=False)
    _report(engine, state, settings, rank, final=True)


def response_loss(model, batch: dict):
    """Mean cross-entropy over the response tokens. Logits are computed only from the first position that
    predicts a response token onwards: the prompt's logits (a 262k-word vocabulary for the built-in) would
    cost a third of the step and carry no loss."""
    import torch
    import torch.nn.functional as functional

    targets = batch["labels"][:, 1:]
    answered = (targets != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(answered[0]) if len(answered) else targets.shape[1] - 1
    keep = torch.arange(first, targets.shape[1], device=batch["labels"].device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets[:, first:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def _sum_over_workers(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch
    import torch.distributed

    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _report(engine, state: dict, settings: dict, rank: int, final: bool) -> None:
    """Save this worker's DeepSpeed shard (and on rank 0 the loop state; at the end also the weights to
    export) into a temporary directory that Ray Train uploads as one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="deepspeed", exclude_frozen_parameters=settings["lora"])
        if final:
            save_weights(engine.module, Path(directory) / "weights", settings, rank)
        if rank == 0:
            (Path(directory) / "state.json").write_text(json.dumps(state))
        loss = state["losses"][-1][1] if state["losses"] else None
        metrics = {"step": state["step"], "epoch": state["epoch"], "loss": loss, "final": final}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def build_student(settings: dict):
    """The student to train: the base model, with LoRA adapters (peft) unless fine-tuning every weight."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(settings["model_path"], dtype=torch.float32)
    if not settings["lora"]:
        return model
    from peft import LoraConfig, get_peft_model

    adapters = LoraConfig(
        r=settings["lora_rank"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, adapters)


def deepspeed_config(settings: dict) -> dict:
    """DeepSpeed's config: ZeRO stage, micro-batch and accumulation, bf16 on GPUs, fp32 on CPUs."""
    return {
        "train_micro_batch_size_per_gpu": settings["batch_size"],
        "gradient_accumulation_steps": settings["gradient_accumulation"],
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": settings["zero_stage"]},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's fused Adam needs CUDA
        "bf16": {"enabled": settings["use_gpu"]},
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }


def save_weights(module, directory: Path, settings: dict, rank: int) -> None:
    """What export needs: the LoRA adapter (peft's format) or the whole model. Under ZeRO-3 each worker
    holds a slice of every weight, so all gather them and rank 0 writes."""
    import deepspeed

    parameters = [p for p in module.parameters() if p.requires_grad or not settings["lora"]]
    gathered = settings["zero_stage"] == 3
    context = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if gathered else _nothing()
    with context:
        if rank == 0:
            module.save_pretrained(directory, safe_serialization=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def export_student(weights: Path, model_path: Path, out: Path, tokenizer, settings: dict) -> None:
    """Merge the trained weights into a plain Hugging Face model directory (safetensors, tokenizer,
    generation config) that `transformers`, vLLM and `rebase serve` load without peft."""
    import torch
    from transformers import AutoModelForCausalLM

    if settings["lora"]:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, weights).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def lineage(data: Path) -> dict:
    """Where the training set came from: the transform's teacher and retrieval, the retrieval's datastore."""
    found: dict = {"data": str(data)}
    transformed = data / "stats.json" if data.is_dir() else None
    if transformed and transformed.exists():
        stats = json.loads(transformed.read_text())
        found["transformed"] = {key: stats.get(key) for key in ("teacher", "engine", "rows", "statuses", "retrieved")}
        retrieved = Path(stats.get("retrieved") or "") / "stats.json"
        if retrieved.is_file():
            found["retrieved"] = json.loads(retrieved.read_text())
            manifest = Path(found["retrieved"].get("datastore") or "") / "manifest.json"
            if manifest.is_file():
                info = json.loads(manifest.read_text())
                found["datastore"] = {
                    "path": found["retrieved"]["datastore"],
                    "embedder": info.get("embedder"),
                    "sources": [source.get("spec") for source in info.get("sources", [])],
                    "updated": info.get("updated"),
                }
    return found


def model_card(task: TaskSpec, config: TrainConfig, summary: TrainSummary, found: dict) -> str:
    """The student's README.md: what it does, how to prompt it, what it was made from, how it trained."""
    example = student_prompt(task, task.examples[0].input, config.few_shot)
    transformed = found.get("transformed", {})
    retrieved = found.get("retrieved", {})
    datastore = found.get("datastore", {})
    hyper = {
        "method": summary.method,
        "epochs": config.epochs,
        "steps": summary.steps,
        "learning rate": config.learning_rate or (2e-4 if not config.full else 2e-5),
        "batch size per worker": config.batch_size,
        "gradient accumulation": config.gradient_accumulation,
        "workers": config.workers,
        "DeepSpeed ZeRO stage": config.zero_stage,
        "max length": config.max_length,
        "few-shot prompts": config.few_shot,
        "seed": config.seed,
    }
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {summary.student}",
        "tags: [rebase, distillation, retrieval-based-distillation]",
        "---",
        f"# {task.name}: a student distilled with ReBase",
        "",
        f"Task: {task.instruction}",
        "",
        "## Prompt format",
        "Send the input inside this prompt (the server does it on the task's route); the answer follows it:",
        "```",
        example,
        "```",
        "",
        "## Lineage",
        f"- base model: `{summary.student}`",
        f"- training data: `{found.get('data')}`: {summary.examples} examples used "
        f"({summary.truncated} truncated, {summary.dropped} dropped as too long)",
    ]
    if transformed:
        lines.append(
            f"- teacher: `{transformed.get('teacher')}` ({transformed.get('engine')}), statuses "
            f"{transformed.get('statuses')}, from the retrieval `{transformed.get('retrieved')}`"
        )
    if retrieved:
        lines.append(
            f"- retrieval: top {retrieved.get('top_k')} rows ({retrieved.get('mode')}), banned {retrieved.get('ban')}"
        )
    if datastore:
        embedder = (datastore.get("embedder") or {}).get("name")
        lines.append(
            f"- datastore: `{datastore.get('path')}` (embedder {embedder}, "
            f"sources {', '.join(datastore.get('sources') or [])}, updated {datastore.get('updated')})"
        )
    lines += ["", "## Training", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in hyper.items()]
    loss = f"{summary.first_loss} -> {summary.final_loss}" if summary.final_loss is not None else "no steps"
    lines += [
        "",
        f"Loss (mean over workers, first step -> last): {loss}; {summary.tokens_per_second:,.0f} training tokens/s.",
        "",
        "Made by `rebase train` (https://arxiv.org/abs/2407.05463 describes the method).",
        "",
    ]
    return "\n".join(lines)
