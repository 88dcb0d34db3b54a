"""`rebase train`: Ray Train + DeepSpeed fine-tune the student on the teacher's examples (LoRA or full).

A recipe read top to bottom: read the training set, encode it (loss on the response only), start a
`TorchTrainer` whose workers each run `_train_loop` on one frozen `LoopSettings` (setup: DeepSpeed ZeRO 0-3
over a Ray Data shard; loop; a checkpoint every epoch or N steps), then merge the final weights into the
student and export a Hugging Face directory with a model card. The directory follows `rebase.stage.StageDir`
(its fingerprint in run.json). The student directory holds:
    config.json, model.safetensors, tokenizer files, generation_config.json   the merged student
    adapter/          LoRA runs: the unmerged adapter (peft's format), which `rebase serve` loads beside other
                      students' adapters on one copy of their shared base (stats.json `base` names it)
    task.yaml         the task it was trained for (the prompt format serving's task routes use)
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
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import yaml

from rebase import precision
from rebase.config import TrainConfig
from rebase.decontaminate import describe
from rebase.errors import RebaseError
from rebase.io import read_parquet
from rebase.models import building_peft_model, canonical_model_name, deepspeed_on_cpu, resolve_model
from rebase.progress import duration
from rebase.stage import StageDir
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
        rows = read_parquet(records, columns=["input", "output", "status"]).to_pylist()
        pairs = [{"input": r["input"], "output": r["output"]} for r in rows if r["status"] == "ok"]
        if not pairs:
            statuses: dict[str, int] = {}
            for row in rows:
                statuses[row["status"]] = statuses.get(row["status"], 0) + 1
            found = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "no records"
            raise RebaseError(
                f"{path} has no ok records to train on ({found}; reasons in its records.parquet and report); "
                "a stronger teacher, or more rows (transform.limit), gives the gates more to keep"
            )
        return pairs
    if not path.is_file():
        raise RebaseError(f"training data not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        elif suffix == ".csv":  # every cell as written: "007" stays "007", not the number 7
            text = pa_csv.ConvertOptions(column_types={"input": pa.string(), "output": pa.string()})
            rows = pa_csv.read_csv(path, convert_options=text).to_pylist()
        else:
            raise RebaseError(f"{path}: training data must be a transformed directory, .jsonl, .parquet or .csv")
    except (json.JSONDecodeError, OSError, ValueError) as error:
        raise RebaseError(f"{path}: cannot read training data ({type(error).__name__})") from None
    if rows and not all(isinstance(r, dict) and "input" in r and "output" in r for r in rows):
        raise RebaseError(f"{path}: every row needs 'input' and 'output'")
    for number, row in enumerate(rows, 1):
        for name in ("input", "output"):
            if row[name] is not None and not isinstance(row[name], str):
                raise RebaseError(
                    f"{path}: row {number}: '{name}' is {type(row[name]).__name__} {json.dumps(row[name])[:40]}, "
                    "not text; write it as a string"
                )
    pairs = [
        {"input": r["input"], "output": r["output"]}
        for r in rows
        if str(r["input"] or "").strip() and str(r["output"] or "").strip()
    ]
    if not pairs:
        raise RebaseError(f"{path} holds no examples with a non-empty input and output")
    return pairs


@dataclass
class Encoded:
    """One example as token ids, labels on the response only."""

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


@dataclass
class TrainingSet:
    """The encoded examples, and how many the length limit cut or dropped."""

    rows: list[dict]  # {"input_ids": [...], "labels": [...]}: the rows of the Ray dataset
    truncated: int  # responses cut to max_length
    dropped: int  # examples whose prompt alone fills max_length


def encode_training_set(
    task: TaskSpec, pairs: list[dict], tokenizer, max_length: int, few_shot: bool = False
) -> TrainingSet:
    """The examples as token ids in the student's prompt format; how many were cut and how many dropped."""
    encoded = TrainingSet([], 0, 0)
    for pair in pairs:
        example = encode_example(tokenizer, student_prompt(task, pair["input"], few_shot), pair["output"], max_length)
        if example is None:
            encoded.dropped += 1
            continue
        encoded.truncated += example.truncated
        encoded.rows.append({"input_ids": example.input_ids, "labels": example.labels})
    return encoded


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict:
    """A batch of encoded examples as right-padded tensors (padding masked out and carrying no loss)."""
    import torch

    lengths = np.array([len(ids) for ids in batch["input_ids"]])
    input_ids = np.full((len(lengths), lengths.max()), pad_id, dtype=np.int64)
    labels = np.full_like(input_ids, IGNORE_INDEX)
    for row, (ids, targets) in enumerate(zip(batch["input_ids"], batch["labels"])):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(targets)] = targets
    attention_mask = (np.arange(input_ids.shape[1]) < lengths[:, None]).astype(np.int64)
    # Arrays made here (Ray Data's are read-only views), so torch shares their memory safely.
    return {
        name: torch.from_numpy(array)
        for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels))
    }


@dataclass(frozen=True)
class Placement:
    """Where the workers run: a GPU each or CPUs only, CPUs reserved per worker, torch threads on CPU."""

    use_gpu: bool
    cpus: int
    threads: int | None


@dataclass(frozen=True)
class LoraSettings:
    """peft's LoRA adapters: rank, scaling, dropout, which modules get them."""

    rank: int
    alpha: int
    dropout: float
    target_modules: list[str] | str

    @classmethod
    def of(cls, config: TrainConfig) -> LoraSettings | None:
        """The config's adapters; None when fine-tuning every weight."""
        if config.full:
            return None
        return cls(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules)


@dataclass(frozen=True)
class LoopSettings:
    """What every Ray Train worker needs to build the same model, optimizer and schedule (pickled to them)."""

    model_path: str
    lora: LoraSettings | None
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    batch_size: int
    gradient_accumulation: int
    epochs: int
    total_steps: int
    checkpoint_every: int | None
    zero_stage: int
    use_gpu: bool
    threads: int | None
    pad_id: int
    seed: int
    dtype: str = "float32"  # as asked ("auto" is resolved on each worker, which knows its device)

    @property
    def method(self) -> str:
        """How the student is trained, as the summary and model card name it."""
        return f"LoRA r={self.lora.rank}" if self.lora else "full fine-tuning"


def loop_settings(
    config: TrainConfig, model_path: Path, pad_id: int, examples: int, placement: Placement
) -> LoopSettings:
    """The workers' settings: the config's, plus the schedule's length (steps over every epoch)."""
    per_worker = examples // config.workers  # Ray Data splits the dataset equally
    batches = math.ceil(per_worker / config.batch_size)
    total = max(1, batches * config.epochs // config.gradient_accumulation)
    if config.max_steps:
        total = min(total, config.max_steps)
    return LoopSettings(
        model_path=str(model_path),
        lora=LoraSettings.of(config),
        learning_rate=config.effective_learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=int(config.warmup_ratio * total),
        batch_size=config.batch_size,
        gradient_accumulation=config.gradient_accumulation,
        epochs=config.epochs,
        total_steps=total,
        checkpoint_every=config.checkpoint_every,
        zero_stage=config.zero_stage,
        use_gpu=placement.use_gpu,
        threads=placement.threads,
        pad_id=pad_id,
        seed=config.seed,
        dtype=config.dtype,
    )


@dataclass
class LoopState:
    """Where training stands: saved as state.json by rank 0 in every checkpoint, read back on resume."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # of the current epoch
    losses: list = field(default_factory=list)  # [step, mean loss over workers]
    tokens: int = 0
    seconds: float = 0.0
    resumed_from_step: int | None = None

    def to_json(self) -> str:
        """state.json's text."""
        values = asdict(self)
        if values["resumed_from_step"] is None:
            del values["resumed_from_step"]  # as before: only a resumed run records it
        return json.dumps(values)


@dataclass
class TrainSummary:
    """What a training run did: the student's stats.json `summary`, and the command's last line."""

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
        """The one-line summary the command prints."""
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
    stage = StageDir(Path(config.out).absolute(), "a rebase student", None, fingerprint_file="run.json")
    done = stage.check(fingerprint)
    if done is not None:
        return TrainSummary(**{**done["summary"], "out": stage.path, "already_done": True})
    # Setup: the student's tokenizer, the encoded examples, where the workers go.
    model_path = resolve_model(config.student)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = encode_training_set(task, pairs, tokenizer, config.max_length, config.few_shot)
    if not encoded.rows:
        raise RebaseError(f"no example fits --max-length {config.max_length} (every prompt is longer); raise it")
    placement = _placement(config)
    precision.check(config.dtype, placement.use_gpu, "train")
    if len(encoded.rows) < config.workers:
        raise RebaseError(f"{len(encoded.rows)} examples cannot feed {config.workers} workers; use fewer workers")
    with stage.writing():
        stage.begin(fingerprint, student=canonical_model_name(config.student))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        settings = loop_settings(config, model_path, pad_id, len(encoded.rows), placement)
        print(
            f"train: {len(encoded.rows)} examples ({encoded.truncated} truncated, {encoded.dropped} dropped), "
            f"{settings.total_steps} steps on {config.workers} worker(s), ZeRO-{config.zero_stage}, {settings.method}, "
            f"{precision.describe(config.dtype, placement.use_gpu)}",
            file=sys.stderr,
        )
        # The loop (on the workers), then export of the final checkpoint and the student's card and stats.
        checkpoint = _fit(config, settings, encoded.rows, placement)
        with checkpoint.as_directory() as directory:
            state = LoopState(**json.loads((Path(directory) / "state.json").read_text()))
            export_student(Path(directory) / "weights", model_path, stage.path, tokenizer, settings.lora is not None)
        (stage.path / "task.yaml").write_text(yaml.safe_dump(task.model_dump(mode="json"), sort_keys=False))
        summary = _summary(config, settings, encoded, state, stage.path, time.monotonic() - started)
        stats = {
            "fingerprint": fingerprint,
            "task": task.name,
            "base": canonical_model_name(config.student),
            "adapter": "adapter" if settings.lora is not None else None,
            "data": str(config.data),
            "config": config.model_dump(mode="json"),
            "lineage": lineage(Path(config.data)),
            "summary": {key: value for key, value in asdict(summary).items() if key not in ("out", "already_done")},
        }
        (stage.path / "README.md").write_text(model_card(task, config, summary, stats["lineage"]))
        stage.finish(stats)
        return summary


def _summary(
    config: TrainConfig, settings: LoopSettings, encoded: TrainingSet, state: LoopState, out: Path, seconds: float
) -> TrainSummary:
    losses = state.losses
    return TrainSummary(
        out=out,
        student=canonical_model_name(config.student),
        examples=len(encoded.rows),
        truncated=encoded.truncated,
        dropped=encoded.dropped,
        steps=state.step,
        epochs=state.epoch,
        workers=config.workers,
        zero_stage=config.zero_stage,
        method=settings.method,
        first_loss=losses[0][1] if losses else None,
        final_loss=losses[-1][1] if losses else None,
        train_tokens=state.tokens,
        tokens_per_second=state.tokens / state.seconds if state.seconds else 0.0,
        seconds=seconds,
        resumed_from_step=state.resumed_from_step,
        losses=losses,
    )


def _fingerprint(task: TaskSpec, pairs: list[dict], config: TrainConfig) -> str:
    """What makes a student what it is: its data, task, base model and the settings that change the weights."""
    ignored = {"out", "storage_path", "max_failures", "threads", "checkpoint_every", "data", "task", "dtype"}
    payload = {
        "data": hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest(),
        "task": task.model_dump(mode="json"),
        "student": canonical_model_name(config.student),
        "settings": config.model_dump(mode="json", exclude=ignored) | precision.hashed(config.dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _placement(config: TrainConfig) -> Placement:
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
    return Placement(use_gpu=use_gpu, cpus=per_worker, threads=None if use_gpu else threads)


def _fit(config: TrainConfig, settings: LoopSettings, rows: list[dict], placement: Placement):
    """Run the workers under Ray Train; the final checkpoint (weights + state) once they finish."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = config.checkpoint_storage
    # Shuffled here, once: the workers may hold every CPU, and Ray Data's shuffle tasks would wait for one.
    rows = list(rows)
    random.Random(config.seed).shuffle(rows)
    gpu = {"GPU": 1} if placement.use_gpu else {}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"settings": settings},
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=placement.use_gpu,
            resources_per_worker={"CPU": placement.cpus, **gpu},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=storage,
            # A lost worker (or node) restarts the worker group from the last reported checkpoint.
            failure_config=FailureConfig(max_failures=config.max_failures),
            # The latest two: the newest may be half-uploaded when a node dies.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ray.data.from_items(rows)},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RebaseError(f"training ended without a checkpoint in {storage}; see the log above")
    return result.checkpoint


def _train_loop(config: dict) -> None:
    """One Ray Train worker: build the student, wrap it in DeepSpeed, train on this worker's shard, report
    checkpoints (every worker saves its ZeRO shard into the same checkpoint)."""
    import ray.train

    settings: LoopSettings = config["settings"]
    context = ray.train.get_context()
    worker = _Worker(context.get_world_rank(), context.get_world_size())
    engine = _deepspeed_engine(settings)
    state = _restore(engine, settings)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(state.epoch, settings.epochs):
        _train_epoch(engine, shard, state, settings, worker, epoch)
        state.epoch, state.batches_done = epoch + 1, 0
        if state.step >= settings.total_steps:
            break
        if not settings.checkpoint_every and epoch + 1 < settings.epochs:
            _report(engine, state, settings, worker.rank, final=False)
    _report(engine, state, settings, worker.rank, final=True)


@dataclass
class _Worker:
    """This worker's place in the group, and what it has trained since the last optimizer step."""

    rank: int
    world: int
    loss: float = 0.0
    batches: int = 0
    tokens: int = 0
    printed: float = field(default_factory=time.monotonic)


def _deepspeed_engine(settings: LoopSettings):
    """The student wrapped by DeepSpeed with its AdamW optimizer and linear warm-up schedule."""
    if not settings.use_gpu:
        deepspeed_on_cpu()
    import deepspeed
    import torch
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = build_student(settings.model_path, settings.lora)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, settings.total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(settings)
    )
    return engine


def _restore(engine, settings: LoopSettings) -> LoopState:
    """The state of the checkpoint Ray Train restarts this run from (weights loaded into `engine`), or a
    fresh one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return LoopState()
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag="deepspeed", load_module_strict=settings.lora is None)
        state = LoopState(**json.loads((Path(directory) / "state.json").read_text()))
    state.resumed_from_step = state.step
    return state


def _train_epoch(engine, shard, state: LoopState, settings: LoopSettings, worker: _Worker, epoch: int) -> None:
    """One pass over this worker's shard, from where a resumed run stopped; checkpoints every N steps."""
    total, every = settings.total_steps, settings.checkpoint_every
    for index, rows in enumerate(shard.iter_batches(batch_size=settings.batch_size, batch_format="numpy")):
        if state.step >= total:
            break
        if index < state.batches_done:
            continue  # trained before the checkpoint this run resumed from
        batch = collate(rows, settings.pad_id)
        began = time.monotonic()
        batch = {name: tensor.to(engine.device) for name, tensor in batch.items()}
        with autocast(settings):
            loss = response_loss(engine, batch)
        engine.backward(loss)
        engine.step()  # DeepSpeed updates the weights every `gradient_accumulation` micro-batches
        state.batches_done = index + 1
        worker.loss, worker.batches = worker.loss + loss.detach().item(), worker.batches + 1
        worker.tokens += int(batch["attention_mask"].sum())
        state.seconds += time.monotonic() - began
        if engine.global_steps == state.step:
            continue
        _end_step(state, engine.global_steps, worker)
        if worker.rank == 0 and (time.monotonic() - worker.printed > 10 or state.step == total):
            rate = state.tokens / max(state.seconds, 1e-9)
            # Straight to stderr: Ray Train's print patch would log each line twice.
            left = (total - state.step) * state.seconds / max(state.step, 1)  # step time only: an estimate
            sys.stderr.write(
                f"train: epoch {epoch + 1}/{settings.epochs} step {state.step}/{total} "
                f"loss {state.losses[-1][1]:.4f} ({rate:,.0f} tokens/s, about {duration(left)} left)\n"
            )
            sys.stderr.flush()
            worker.printed = time.monotonic()
        if every and state.step % every == 0 and state.step < total:
            _report(engine, state, settings, worker.rank, final=False)


def _end_step(state: LoopState, step: int, worker: _Worker) -> None:
    """Record an optimizer step: the loss and tokens of its micro-batches, summed over all workers."""
    loss, batches, tokens = _sum_over_workers([worker.loss, worker.batches, worker.tokens], worker.world)
    state.step = step
    state.losses.append([step, round(loss / batches, 4)])
    state.tokens += int(tokens)
    worker.loss, worker.batches, worker.tokens = 0.0, 0, 0


def autocast(settings: LoopSettings):
    """bfloat16 autocast around the forward pass when the precision resolves to it on this worker's device
    (weights, gradients and optimizer state stay float32, so the export is a plain float32 model)."""
    import torch

    device = "cuda" if settings.use_gpu else "cpu"
    if precision.resolve(settings.dtype, device) == "bfloat16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


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


def _report(engine, state: LoopState, settings: LoopSettings, rank: int, final: bool) -> None:
    """Save this worker's DeepSpeed shard (and on rank 0 the loop state; at the end also the weights to
    export) into a temporary directory that Ray Train uploads as one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="deepspeed", exclude_frozen_parameters=settings.lora is not None)
        if final:
            save_weights(engine.module, Path(directory) / "weights", settings, rank)
        if rank == 0:
            (Path(directory) / "state.json").write_text(state.to_json())
        loss = state.losses[-1][1] if state.losses else None
        metrics = {"step": state.step, "epoch": state.epoch, "loss": loss, "final": final}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def build_student(model_path: str | Path, lora: LoraSettings | None):
    """The student to train: the base model, with LoRA adapters (peft) unless fine-tuning every weight."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    adapters = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with building_peft_model():
        return get_peft_model(model, adapters)


def deepspeed_config(settings: LoopSettings) -> dict:
    """DeepSpeed's config: ZeRO stage, micro-batch and accumulation, bf16 on GPUs, fp32 on CPUs."""
    return {
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": settings.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's fused Adam needs CUDA
        "bf16": {"enabled": settings.use_gpu},
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }


def save_weights(module, directory: Path, settings: LoopSettings, rank: int) -> None:
    """What export needs: the LoRA adapter (peft's format) or the whole model. Under ZeRO-3 each worker
    holds a slice of every weight, so all gather them and rank 0 writes."""
    import deepspeed

    parameters = [p for p in module.parameters() if p.requires_grad or settings.lora is None]
    gathered = settings.zero_stage == 3
    context = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if gathered else nullcontext()
    with context:
        if rank == 0:
            module.save_pretrained(directory, safe_serialization=True)


def export_student(weights: Path, model_path: Path, out: Path, tokenizer, lora: bool) -> None:
    """Merge the trained weights (a LoRA adapter, or the whole model) into a plain Hugging Face model
    directory (safetensors, tokenizer, generation config) that `transformers`, vLLM and `rebase serve` load
    without peft; a LoRA adapter is also kept unmerged in `adapter/`."""
    import torch
    from transformers import AutoModelForCausalLM

    if lora:
        if not torch.cuda.is_available():
            deepspeed_on_cpu()
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        with building_peft_model():
            model = PeftModel.from_pretrained(base, weights).merge_and_unload()
        shutil.rmtree(out / "adapter", ignore_errors=True)  # a resumed export's partial copy
        shutil.copytree(weights, out / "adapter")
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
        keys = ("teacher", "engine", "rows", "statuses", "retrieved", "contamination")
        found["transformed"] = {key: stats.get(key) for key in keys}
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
        student_prompt(task, task.examples[0].input, config.few_shot),
        "```",
        "",
        "## Lineage",
        f"- base model: `{summary.student}`",
        f"- training data: `{found.get('data')}`: {summary.examples} examples used "
        f"({summary.truncated} truncated, {summary.dropped} dropped as too long)",
        *_lineage_lines(found),
        "",
        "## Training",
        "| setting | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in _hyperparameters(config, summary).items()),
    ]
    loss = f"{summary.first_loss} -> {summary.final_loss}" if summary.final_loss is not None else "no steps"
    lines += [
        "",
        f"Loss (mean over workers, first step -> last): {loss}; {summary.tokens_per_second:,.0f} training tokens/s.",
        "",
        "Made by `rebase train` (https://arxiv.org/abs/2407.05463 describes the method).",
        "",
    ]
    return "\n".join(lines)


def _lineage_lines(found: dict) -> list[str]:
    """The model card's lines on the teacher, the retrieval and the datastore, for those that are known."""
    lines = []
    transformed = found.get("transformed", {})
    if transformed:
        lines.append(
            f"- teacher: `{transformed.get('teacher')}` ({transformed.get('engine')}), statuses "
            f"{transformed.get('statuses')}, from the retrieval `{transformed.get('retrieved')}`"
        )
    retrieved = found.get("retrieved", {})
    if retrieved:
        lines.append(
            f"- retrieval: top {retrieved.get('top_k')} rows ({retrieved.get('mode')}), banned {retrieved.get('ban')}"
        )
    if transformed or retrieved:  # what was compared with the evaluation set, and what matched
        lines.append(f"- decontamination, retrieval: {describe(retrieved.get('contamination'), 'retrieved rows')}")
        lines.append(
            f"- decontamination, transform: {describe(transformed.get('contamination'), 'generated inputs')} "
            "Examples that copy one are never trained on."
        )
    datastore = found.get("datastore", {})
    if datastore:
        embedder = (datastore.get("embedder") or {}).get("name")
        lines.append(
            f"- datastore: `{datastore.get('path')}` (embedder {embedder}, "
            f"sources {', '.join(datastore.get('sources') or [])}, updated {datastore.get('updated')})"
        )
    return lines


def _hyperparameters(config: TrainConfig, summary: TrainSummary) -> dict:
    """The model card's training table: setting name -> value."""
    return {
        "method": summary.method,
        "epochs": config.epochs,
        "steps": summary.steps,
        "learning rate": config.effective_learning_rate,
        "batch size per worker": config.batch_size,
        "gradient accumulation": config.gradient_accumulation,
        "workers": config.workers,
        "DeepSpeed ZeRO stage": config.zero_stage,
        "max length": config.max_length,
        "few-shot prompts": config.few_shot,
        "seed": config.seed,
    }
