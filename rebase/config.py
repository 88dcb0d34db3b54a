"""Pydantic configs, one per stage, loaded from YAML; defaults live here and nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from rebase.errors import RebaseError

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]


def _check_range(value: tuple[int, int]) -> tuple[int, int]:
    if value[0] < 1 or value[1] < value[0]:
        raise ValueError("must be (min, max) with 1 <= min <= max")
    return value


Concurrency = Annotated[tuple[int, int], AfterValidator(_check_range)]  # an actor pool's (min, max) size


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatastoreConfig(StageConfig):
    """`rebase datastore build`: which sources, which embedder, how rows become cells and vectors."""

    sources: list[str] = Field(min_length=1)
    out: Path
    embedder: str = "builtin:minilm"
    index: IndexKind = "auto"
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
        values = yaml.safe_load(path.read_text()) or {}
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


class TransformConfig(StageConfig):
    """`rebase transform`: which teacher, on which engine, how many at once, how strict."""

    retrieved: Path
    task: Path
    out: Path
    teacher: str = Field(
        "builtin:gemma3-270m",
        description="a built-in, a local model directory, an HF id, or the "
        "model name the OpenAI-compatible endpoint serves",
    )
    engine: Engine = "transformers"
    limit: int | None = Field(None, ge=1, description="transform only the best-ranked N rows (a cheap trial)")
    max_value_chars: int = Field(250, ge=16, description="row values are truncated to this in the prompt (paper)")
    max_new_tokens: int = Field(512, ge=8)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    constrained: bool = Field(True, description="constrain answers to the JSON schema (xgrammar, vLLM, json_schema)")
    judge: bool = Field(False, description="second pass: the teacher says yes/no to each ok example (paper's filter)")
    batch_size: int = Field(32, ge=1, description="transformers engine: prompts decoded together (one forward pass)")
    prompts_per_call: int = Field(
        128, ge=1, description="prompts per teacher-actor call; answers are written to disk per call"
    )
    concurrency: Concurrency | None = Field(
        None, description="(min, max) teacher actors; default (1, GPUs) on GPUs, (1, CPUs / threads) on CPUs"
    )
    threads: int | None = Field(None, ge=1, description="torch threads per CPU actor; default all cores")
    base_url: str | None = Field(None, description="engine openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="engine openai: environment variable holding the key")
    request_concurrency: int = Field(8, ge=1, description="engine openai: requests in flight per actor")
    max_retries: int = Field(5, ge=0, description="engine openai: retries on 408/409/429/5xx, timeouts, resets")
    request_timeout: float = Field(120.0, gt=0, description="engine openai: seconds per request")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="engine vllm")
    max_model_len: int | None = Field(None, ge=64, description="engine vllm")

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> TransformConfig:
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine openai needs base_url (the endpoint, e.g. http://127.0.0.1:8000/v1)")
        return self
