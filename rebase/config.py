"""Pydantic configs, one per stage, loaded from YAML; defaults live here and nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rebase.errors import RebaseError
from rebase.precision import Precision

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]
TASK_FILE = "task YAML file"
# The learning rate when none is given (TrainConfig.effective_learning_rate): adapters take larger steps.
LORA_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE = 2e-5
PRECISION_AUTO = "auto: bfloat16 on GPUs and on CPUs with native bfloat16 (avx512_bf16, AMX), else float32"


def _short(rate: float) -> str:
    return f"{rate:.0e}".replace("e-0", "e-")  # 2e-4, not 0.0002 or 2e-04


def _check_range(value: tuple[int, int]) -> tuple[int, int]:
    if value[0] < 1 or value[1] < value[0]:
        raise ValueError("must be (min, max) with 1 <= min <= max")
    return value


Concurrency = Annotated[tuple[int, int], AfterValidator(_check_range)]  # an actor pool's (min, max) size


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatastoreConfig(StageConfig):
    """`rebase datastore build`: which sources, which embedder, how rows become cells and vectors."""

    sources: list[str] = Field(
        min_length=1, description="SPECs to ingest: bigbench[:task,...], files:PATH_OR_GLOB, hf:DATASET_ID[:CONFIG]"
    )
    out: Path = Field(description="datastore directory (created, or extended if it exists)")
    embedder: str = Field("builtin:minilm", description="a built-in, a local model directory or an HF id")
    index: IndexKind = Field("auto", description="FAISS index kind; auto: flat up to flat_max_vectors, else IVF")
    rows_per_dataset: int = Field(1000, ge=1, description="row cap per dataset, sampled evenly (paper: 1,000)")
    max_value_chars: int = Field(1000, ge=16, description="longer cell values are truncated")
    embed_max_tokens: int | None = Field(
        None, ge=8, description="truncate texts to this many tokens when embedding; default: the model's own limit"
    )
    description: str | None = Field(None, description="description for files: sources without a sidecar")
    block_rows: int = Field(1024, ge=1, description="distinct values per embedding block (the resume unit)")
    embed_batch_size: int = Field(32, ge=1, description="texts per forward pass; small batches pad less")
    embed_concurrency: Concurrency | None = Field(
        None, description="(min, max) embedding actors; default (1, GPUs) on GPUs, (1, CPUs / embed_threads) on CPUs"
    )
    embed_threads: int | None = Field(None, ge=1, description="torch threads per CPU actor; default min(4, cores)")
    embed_dtype: Precision = Field("auto", description="precision of the embedder; " + PRECISION_AUTO)
    shard_vectors: int = Field(1_000_000, ge=1, description="most vectors in one FAISS shard")
    flat_max_vectors: int = Field(
        200_000, ge=1, description="with index=auto, shards up to this size are exact (flat), larger are IVF"
    )

    @model_validator(mode="after")
    def _no_blank_sources(self) -> DatastoreConfig:
        if any(not s.strip() for s in self.sources):
            raise ValueError("sources: a source spec is empty")
        return self


Config = TypeVar("Config", bound=BaseModel)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    field = ".".join(str(part) for part in first["loc"])
    return f"field '{field}': {message}" if field else message


def build_config(model: type[Config], values: dict, origin: str = "command line") -> Config:
    """Validate plain values into a config; a bad field becomes one RebaseError naming it and its origin."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise RebaseError(f"{origin}: {_describe(error)}") from None


def load_config(model: type[Config], path: Path, overrides: dict | None = None) -> Config:
    """Read YAML from `path`, apply non-None overrides (CLI flags of the same name), validate."""
    if not path.is_file():
        raise RebaseError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise RebaseError(f"{path}: not UTF-8 text; a config file is YAML in UTF-8") from None
    except OSError as error:
        raise RebaseError(f"{path}: cannot be read ({error.strerror})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RebaseError(f"{path}: not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise RebaseError(f"{path}: expected a mapping of fields at the top level")
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    try:
        return model.model_validate({**values, **given})
    except ValidationError as error:
        field = str(error.errors()[0]["loc"][0]) if error.errors()[0]["loc"] else ""
        origin = "command line" if field in given else str(path)
        raise RebaseError(f"{origin}: {_describe(error)}") from None


Engine = Literal["transformers", "vllm", "openai"]


class DecontaminationConfig(StageConfig):
    """How `retrieve` and `transform` compare their texts with the task's evaluation set (rebase/decontaminate.py)."""

    decontaminate: bool = Field(
        True,
        description="compare retrieved rows and generated inputs with the task's evaluation source (its `eval`): "
        "long n-gram overlap and embedding near-duplicates; a match is never handed to the teacher or trained on",
    )
    contamination_ngram: int = Field(
        13,
        ge=4,
        le=64,
        description="the fewest words in a row that make an n-gram match; more where the evaluation inputs "
        "share runs of that length among themselves",
    )
    contamination_similarity: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="cosine similarity to an evaluation input that makes a near-duplicate; default: derived "
        "from the evaluation set (its inputs' 99th-percentile similarity to one another, at least 0.9)",
    )


class GenerationConfig(StageConfig):
    """How a stage generates text (the teacher in `transform`, the student in `evaluate`): which engine,
    how many prompts at once, how many actors, and for an endpoint how to reach it."""

    engine: Engine = Field("transformers", description="how text is generated")
    max_new_tokens: int = Field(512, ge=1, description="most tokens generated per answer")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="sampling temperature; 0 decodes greedily")
    batch_size: int = Field(32, ge=1, description="transformers engine: prompts decoded together (one forward pass)")
    prompts_per_call: int = Field(128, ge=1, description="prompts per actor call; answers are written to disk per call")
    concurrency: Concurrency | None = Field(
        None, description="(min, max) generation actors; default (1, GPUs) on GPUs, (1, CPUs / threads) on CPUs"
    )
    threads: int | None = Field(None, ge=1, description="torch threads per CPU actor; default all cores")
    base_url: str | None = Field(None, description="engine openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="engine openai: environment variable holding the key")
    request_concurrency: int = Field(8, ge=1, description="engine openai: requests in flight per actor")
    max_retries: int = Field(5, ge=0, description="engine openai: retries on 408/409/429/5xx, timeouts, resets")
    request_timeout: float = Field(120.0, gt=0, description="engine openai: seconds per request")
    rpm: int | None = Field(None, ge=1, description="engine openai: most requests per minute, all actors together")
    tpm: int | None = Field(
        None, ge=1, description="engine openai: most tokens per minute (prompt + max tokens), all actors together"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="engine vllm")
    max_model_len: int | None = Field(None, ge=64, description="engine vllm")
    dtype: Precision = Field("auto", description="model precision (transformers, vllm); " + PRECISION_AUTO)

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> GenerationConfig:
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine openai needs base_url (the endpoint, e.g. http://127.0.0.1:8000/v1)")
        return self


class TransformConfig(GenerationConfig, DecontaminationConfig):
    """`rebase transform`: which teacher, on which engine, how many at once, how strict."""

    retrieved: Path = Field(description="retrieved directory (from rebase retrieve)")
    task: Path = Field(description=TASK_FILE)
    out: Path = Field(description="transformed directory (created, or resumed)")
    teacher: str = Field(
        "builtin:gemma3-270m",
        description="a built-in, a local model directory, an HF id, or the "
        "model name the OpenAI-compatible endpoint serves",
    )
    limit: int | None = Field(None, ge=1, description="transform only the best-ranked N rows (a cheap trial)")
    max_value_chars: int = Field(250, ge=16, description="row values are truncated to this in the prompt (paper)")
    max_new_tokens: int = Field(512, ge=8, description="most tokens generated per answer")
    constrained: bool = Field(True, description="constrain answers to the JSON schema (xgrammar, vLLM, json_schema)")
    judge: bool = Field(False, description="second pass: the teacher says yes/no to each ok example (paper's filter)")
    embedder: str = Field("builtin:minilm", description="embeds generated inputs (task-fit and near-duplicate gates)")
    fit_margin: float = Field(
        0.1,
        ge=0.0,
        le=2.0,
        description="task fit: an input must be within this of the least similarity between the task's example inputs",
    )
    fit_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="task fit: this least similarity, not one derived from the examples"
    )
    near_duplicate_similarity: float = Field(
        0.97, gt=0.0, le=1.0, description="an input this similar to a better-ranked ok input is a duplicate"
    )
    consistency: bool = Field(True, description="the teacher answers each ok input again, few-shot; kept if it agrees")
    price_input_per_million: float | None = Field(
        None, ge=0.0, description="the teacher's price per million prompt tokens, for the cost in stats and --dry-run"
    )
    price_output_per_million: float | None = Field(
        None, ge=0.0, description="the teacher's price per million generated tokens, for the cost in stats, --dry-run"
    )
    max_label_share: float = Field(0.6, gt=0.0, le=1.0, description="most share of the ok records one label may take")


class TrainConfig(StageConfig):
    """`rebase train`: the student, LoRA or full fine-tuning, DeepSpeed ZeRO, Ray Train workers, checkpoints."""

    data: Path = Field(description="a transformed directory (its ok records) or a jsonl/parquet/csv of input, output")
    task: Path = Field(description=TASK_FILE)
    out: Path = Field(description="the student directory: the merged model, model card, stats, checkpoints/")
    student: str = Field("builtin:gemma3-270m", description="a built-in, a local model directory or an HF id")
    full: bool = Field(False, description="fine-tune every weight instead of LoRA adapters")
    lora_rank: int = Field(16, ge=1, description="rank of the LoRA adapters")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling: updates are scaled by alpha / rank")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | str = Field("all-linear", description="peft target_modules")
    epochs: int = Field(3, ge=1, description="passes over the training set")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (a trial)")
    learning_rate: float | None = Field(
        None,
        gt=0,
        description=f"default {_short(LORA_LEARNING_RATE)} with LoRA, {_short(FULL_LEARNING_RATE)} for full training",
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(8, ge=1, description="examples per worker per forward pass (micro-batch)")
    gradient_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_length: int = Field(512, ge=16, description="tokens per example; longer responses are cut and counted")
    few_shot: bool = Field(False, description="put the task's examples in every prompt (then also when evaluating)")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage")
    workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: a GPU per worker if the cluster has GPUs")
    threads: int | None = Field(None, ge=1, description="torch threads per CPU worker; default CPUs / workers")
    storage_path: str | None = Field(None, description="checkpoints: a directory or cloud URI; default OUT/checkpoints")
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint every N steps; default once per epoch")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint before giving up")
    seed: int = 0
    dtype: Precision = Field(
        "auto",
        description="compute precision (bfloat16 autocast, float32 master weights and export); " + PRECISION_AUTO,
    )

    # Derived defaults as properties, not filled-in fields: a student's stats.json and its fingerprint keep
    # the config as given (None), so students trained before stay recognised.
    @property
    def effective_learning_rate(self) -> float:
        """The learning rate to train with: the one given, else the default for LoRA or full fine-tuning."""
        if self.learning_rate is not None:
            return self.learning_rate
        return FULL_LEARNING_RATE if self.full else LORA_LEARNING_RATE

    @property
    def checkpoint_storage(self) -> str:
        """Where Ray Train keeps checkpoints: `storage_path`, else OUT/checkpoints (absolute: Ray needs it)."""
        return self.storage_path or str(Path(self.out).absolute() / "checkpoints")


class EvaluateConfig(GenerationConfig):
    """`rebase evaluate`: a model's answers on held-out data, scored; optionally beside another model's."""

    model: str = Field(description="a student directory, a built-in, an HF id, or the served name (engine openai)")
    task: Path = Field(description=TASK_FILE)
    data: str | None = Field(None, description="held-out data as a datastore SPEC; default the task file's eval")
    out: Path = Field(description="evaluation directory (created, or resumed)")
    compare: str | None = Field(None, description="a second model scored on the same data ('base': the student's base)")
    limit: int | None = Field(None, ge=1, description="score a fixed sample of N examples")
    few_shot: bool | None = Field(None, description="the task's examples in each prompt (default: as trained)")
    max_new_tokens: int = Field(256, ge=1, description="most tokens generated per answer")


class ServeConfig(StageConfig):
    """`rebase serve`: which model, on which address, how replicas scale and batch, what requests may ask."""

    model: list[str] = Field(
        min_length=1,
        description="a student directory, a directory of students, a built-in or an HF id; several share one "
        "endpoint, each under its directory's name (LoRA students of one base share one copy of it)",
    )
    base: str | None = Field(
        None, description="the base every LoRA student shares (one trained from another base is refused)"
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="vllm: Ray Serve LLM's vLLM app on GPU nodes (its own routes and limits)"
    )
    task: Path | None = Field(None, description="a task file: adds the task's routes (/tasks/NAME/v1/...)")
    name: str | None = Field(None, description="the model name clients send; default the directory's name")
    host: str = Field("127.0.0.1", description="address to bind; anything but loopback is reachable by others")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    few_shot: bool | None = Field(None, description="the task's examples in task-route prompts; default as trained")
    max_batch_size: int = Field(16, ge=1, description="requests decoded together in one forward pass")
    batch_wait_timeout_s: float = Field(0.1, ge=0.0, le=5.0, description="how long a batch waits to fill")
    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest replicas")
    max_replicas: int = Field(1, ge=1, description="autoscaling: most replicas")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling: requests in flight per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once")
    threads: int | None = Field(None, ge=1, description="torch threads per CPU replica; default all cores")
    dtype: Precision = Field("auto", description="model precision; " + PRECISION_AUTO)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_header_bytes: int = Field(32_768, ge=1024, description="requests with larger headers in all get 431")
    max_prompt_tokens: int = Field(4096, ge=16)
    max_tokens_limit: int = Field(1024, ge=1, description="the most `max_tokens` a request may ask for")
    max_choices: int = Field(8, ge=1, description="the most prompts x n one request may ask for")
    api_key_env: str = Field("REBASE_API_KEY", description="when this variable is set, requests need its bearer key")

    @field_validator("model", mode="before")
    @classmethod
    def _one_or_several(cls, value):
        if isinstance(value, str | Path):
            return [str(value)]
        return [str(one) if isinstance(one, Path) else one for one in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _replicas_in_order(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class RetrieveConfig(DecontaminationConfig):
    """`rebase retrieve`: the top K rows of a datastore for a task by the ReBase score."""

    datastore: Path = Field(description="datastore directory (from rebase datastore build)")
    task: Path = Field(description=TASK_FILE)
    out: Path = Field(description="retrieved directory to write")
    top_k: int = Field(3000, ge=1, description="rows to keep")
    exact: bool = Field(False, description="score every row instead of re-scoring ANN candidates")
    depth: int = Field(4000, ge=1, description="nearest values per query vector and index shard")
    dataset_rows: int | None = Field(
        None,
        ge=0,
        description="approximate mode also re-scores the rows of the datasets whose descriptions are closest "
        "to the instruction, this many rows in all (default: 2 x top_k)",
    )
    per_dataset_cap: int | None = Field(None, ge=1, description="most rows from one dataset")
    pool_factor: int = Field(
        4, ge=1, description="rows kept before duplicates and the per-dataset cap are taken out: this many x top_k"
    )
    embedder: str | None = Field(None, description="must match the datastore's embedder")
    match_kind: bool = Field(
        True,
        description="keep only rows whose text is of a kind (words, numbers, code) one of the task's example "
        "inputs is: digit-heavy rows stop winning word tasks on surface likeness",
    )

    @model_validator(mode="after")
    def _derived_defaults(self) -> RetrieveConfig:
        if self.dataset_rows is None:
            self.dataset_rows = 2 * self.top_k
        return self


STAGES = ("datastore", "retrieve", "transform", "train", "evaluate", "serve")

# The fields the pipeline fills in itself: each stage reads the one before it from the run directory.
_WIRED = {
    "retrieve": {"datastore", "task", "out"},
    "transform": {"retrieved", "task", "out"},
    "train": {"data", "task", "out"},
    "evaluate": {"model", "task", "out"},
    "serve": {"model", "task"},
}
_STAGE_MODELS = {
    "retrieve": RetrieveConfig,
    "transform": TransformConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "serve": ServeConfig,
}


class PipelineConfig(StageConfig):
    """`rebase run`: one task through every stage, each stage's section holding that stage's own fields.

    `datastore` holds DatastoreConfig fields (`out` defaults to RUN/datastore/store, and a shared path
    lets several runs build one store once) or `path:` alone for an existing datastore used as it is.
    `evaluate: null` skips evaluation; a `serve` section adds the serving stage at the end."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the run's name")
    task: Path
    run_dir: Path | None = Field(None, description="default out/runs/NAME; --run-dir overrides")

    @property
    def default_run_dir(self) -> Path:
        """Where the run goes unless run_dir or --run-dir says otherwise."""
        return Path("out/runs") / self.name

    datastore: dict
    retrieve: dict = Field(default_factory=dict)
    transform: dict = Field(default_factory=dict)
    train: dict = Field(default_factory=dict)
    evaluate: dict | None = Field(default_factory=dict)
    serve: dict | None = None

    @model_validator(mode="after")
    def _stages_valid(self) -> PipelineConfig:
        for stage in self.stages():
            self.stage_config(stage, Path("RUN"))
        return self

    def stages(self) -> list[str]:
        """The stages this pipeline runs, in order."""
        skipped = {"evaluate"} if self.evaluate is None else set()
        if self.serve is None:
            skipped.add("serve")
        return [stage for stage in STAGES if stage not in skipped]

    def stage_config(self, stage: str, run_dir: Path) -> BaseModel:
        """The stage's own config: its section plus the paths that wire it to the stages before it."""
        section = dict(getattr(self, stage) or {})
        if stage == "datastore":
            if "path" in section:
                if set(section) != {"path"}:
                    raise ValueError("datastore: give either path (an existing datastore) or build fields, not both")
                return DatastoreConfig(sources=["(existing)"], out=Path(section["path"]).expanduser())
            section.setdefault("out", run_dir / "datastore" / "store")
            section["out"] = Path(section["out"]).expanduser()
            return _validated(stage, DatastoreConfig, section)
        wired = _WIRED[stage] & set(section)
        if wired:
            raise ValueError(f"{stage}.{sorted(wired)[0]} is set by the pipeline (the run directory wires stages)")
        section["task"] = self.task
        if stage == "retrieve":
            datastore = self.stage_config("datastore", run_dir)
            section.update(datastore=datastore.out, out=run_dir / "retrieve")
        elif stage == "transform":
            section.update(retrieved=run_dir / "retrieve", out=run_dir / "transform")
        elif stage == "train":
            section.update(data=run_dir / "transform", out=run_dir / "train")
        elif stage == "evaluate":
            section.update(model=str(run_dir / "train"), out=run_dir / "evaluate")
        else:
            section.update(model=str(run_dir / "train"))
        return _validated(stage, _STAGE_MODELS[stage], section)


def _validated(stage: str, model: type[Config], values: dict) -> Config:
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join([stage, *(str(part) for part in first["loc"])])
        raise ValueError(f"{field}: {first['msg'].removeprefix('Value error, ')}") from None
