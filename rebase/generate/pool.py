"""Prompts through a Ray Data actor pool of engines, answers stored per call so a re-run only sends what has
no answer yet. The teacher (`rebase transform`) and the student under evaluation (`rebase evaluate`) both
generate through it."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebase import precision
from rebase.config import GenerationConfig
from rebase.errors import RebaseError
from rebase.generate.engines import GenerationParams, OpenAIEngine, make_engine
from rebase.io import write_parquet_atomic
from rebase.progress import heartbeat, progress_bar
from rebase.ray_setup import actor_pool

ANSWER_SCHEMA = pa.schema(
    [
        ("prompt_hash", pa.string()),
        ("text", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("seconds", pa.float64()),
    ]
)


@dataclass(frozen=True)
class GenerationRun:
    """What one `GenerationPool.answer` call did: prompts sent and answered before, generation time, and
    the tokens of every answer returned (earlier runs' included)."""

    sent: int
    cached: int
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    sent_prompt_tokens: int = 0  # of the prompts sent in this run only: what this run cost
    sent_completion_tokens: int = 0

    def __add__(self, other: GenerationRun) -> GenerationRun:
        return GenerationRun(*(a + b for a, b in zip(astuple(self), astuple(other))))


class GenerationPool:
    """Sends prompts that have no answer yet through a Ray Data actor pool; stores answers per batch.
    `chat`: wrap prompts in the model's chat template when it has one (None: when it has one)."""

    def __init__(self, config: GenerationConfig, model: str, chat: bool | None = None):
        self.config = config
        self.model = model
        self.chat = chat
        self.limiter = None  # the pool's RateLimiter actor, made by _prepare when rpm or tpm is set
        self._ready = False

    def _prepare(self) -> None:
        """Resolve the model once in the driver (converting a built-in, or one clear error) and, for an
        endpoint, make one tiny request so a wrong URL or key fails before any work is sent."""
        from rebase.models import resolve_model
        from rebase.ray_setup import cluster_gpus, ensure_ray

        config = self.config
        if self._ready:
            return
        ensure_ray()
        import ray

        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        gpus = cluster_gpus() if config.engine != "openai" else 0
        if config.engine == "vllm" and not gpus:
            raise RebaseError("engine 'vllm' needs GPUs in the Ray cluster; use --engine transformers on CPUs")
        if config.engine == "openai":
            model = self.model
            OpenAIEngine(model, config.base_url, config.api_key_env, max_retries=1, timeout=30, chat=self.chat).check()
        else:
            precision.check(config.dtype, bool(gpus), self.model)
            model = str(resolve_model(self.model))
        threads = None if gpus else (config.threads or cpus)
        self.engine_options = {
            "kind": config.engine,
            "model": model,
            "batch_size": config.batch_size,
            "threads": threads,
            "base_url": config.base_url,
            "api_key_env": config.api_key_env,
            "concurrency": config.request_concurrency,
            "max_retries": config.max_retries,
            "timeout": config.request_timeout,
            "structured": getattr(config, "constrained", True),
            "chat": self.chat,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "max_model_len": config.max_model_len,
            "dtype": config.dtype,
        }
        if config.concurrency:
            self.concurrency = config.concurrency
        elif gpus:
            self.concurrency = (1, max(1, int(gpus)))
        elif config.engine == "openai":
            self.concurrency = (1, 1)
        else:
            self.concurrency = (1, max(1, cpus // (threads or 1)))
        self.gpus = 1 if gpus else 0
        # Reserve the actor's host memory so Ray places actors where they fit (measured: 2.9 GiB RSS for
        # the 1.1 GB float32 built-in on CPU): twice the weights plus 1 GiB of working room.
        weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) if config.engine != "openai" else 0
        self.memory = int(2 * weights + 2**30) if weights else None
        self.cpus = 0.25 if config.engine == "openai" else 1  # an endpoint client mostly waits
        if config.engine == "openai" and (config.rpm or config.tpm):
            from rebase.generate.limits import RateLimiter

            # one for the pool, every pass (transform, judge, consistency) and actor drawing on it
            self.limiter = ray.remote(num_cpus=0)(RateLimiter).remote(config.rpm, config.tpm)
            self.engine_options["limiter"] = self.limiter
        self._ready = True

    def limits(self) -> dict | None:
        """The rate limiter's counts (requests, seconds waited, pauses for Retry-After), or None without one."""
        if self.limiter is None:
            return None
        import ray

        return {"rpm": self.config.rpm, "tpm": self.config.tpm, **ray.get(self.limiter.report.remote())}

    def answer(
        self, prompts: dict[str, str], cache: Path, params: GenerationParams, what: str
    ) -> tuple[dict[str, dict], GenerationRun]:
        """Answers for every prompt hash (cached, new, or failed with `error`) and this run's counts."""
        answers = _read_answers(cache)
        pending = [h for h in prompts if h not in answers]
        seconds = 0.0
        failed: dict[str, dict] = {}
        if pending:
            print(
                f"{what}: {len(prompts) - len(pending)} of {len(prompts)} prompts answered before; "
                f"sending {len(pending)}",
                file=sys.stderr,
            )
            self._prepare()
            cache.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            finished = FinishedCount()
            bar = progress_bar(total=len(pending), desc=what, unit="prompt")
            with bar, finished, heartbeat(bar, position=finished.total) as sync:
                for batch in self._run(pending, prompts, params, finished.handle):
                    errors = batch.column("error").to_pylist()
                    kept = batch.filter(pa.array([e is None for e in errors])).select(ANSWER_SCHEMA.names)
                    if kept.num_rows:
                        kept = kept.cast(ANSWER_SCHEMA)
                        key = hashlib.sha256("".join(kept.column("prompt_hash").to_pylist()).encode()).hexdigest()
                        write_parquet_atomic(cache / f"part-{key[:20]}.parquet", kept)
                        for answer in kept.to_pylist():
                            answers[answer["prompt_hash"]] = answer
                    for h, error in zip(batch.column("prompt_hash").to_pylist(), errors):
                        if error is not None:
                            failed[h] = {"error": error}
                    finished.floor += batch.num_rows
                    sync()
            seconds = time.monotonic() - started
        lost = {"error": "no answer came back from the engine"}  # kept as failed; a re-run sends it again
        result = {h: answers.get(h) or failed.get(h, lost) for h in prompts}
        sent = [result[h] for h in pending]
        run = GenerationRun(
            sent=len(pending),
            cached=len(prompts) - len(pending),
            seconds=seconds,
            prompt_tokens=sum(a.get("prompt_tokens") or 0 for a in result.values()),
            completion_tokens=sum(a.get("completion_tokens") or 0 for a in result.values()),
            sent_prompt_tokens=sum(a.get("prompt_tokens") or 0 for a in sent),
            sent_completion_tokens=sum(a.get("completion_tokens") or 0 for a in sent),
        )
        return result, run

    def _run(self, pending: list[str], prompts: dict[str, str], params: GenerationParams, progress):
        import ray

        size = self.config.prompts_per_call
        items = [{"prompt_hash": h, "prompt": prompts[h]} for h in pending]
        # One Ray block per actor call, so the pool has work to scale against and answers stream back. A lost
        # actor is restarted and its call retried: Ray Data's default for actor pools.
        dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / size)))
        dataset = dataset.map_batches(
            GenerationActor,
            fn_constructor_kwargs={"engine": self.engine_options, "params": params.__dict__, "progress": progress},
            batch_size=size,
            batch_format="numpy",
            compute=actor_pool(self.concurrency),
            num_gpus=self.gpus,
            num_cpus=self.cpus,
            memory=self.memory,
        )
        # prefetch_batches=0: each answer comes back as soon as its call ends (prefetching holds one back)
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


class GenerationActor:
    """One engine per Ray actor, loaded once; each call answers one batch of prompts and tells the driver's
    `progress` counter (a `FinishedCount` actor) as each prompt finishes."""

    def __init__(self, engine: dict, params: dict, progress=None):
        options = dict(engine)
        self.engine = make_engine(options.pop("kind"), options.pop("model"), **options)
        self.params = GenerationParams(**params)
        self.progress = progress

    def _finished(self, count: int) -> None:
        self.progress.add.remote(count)  # fire and forget: progress must never slow generation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        started = time.monotonic()
        on_done = self._finished if self.progress is not None else None
        completions = self.engine.generate([str(p) for p in batch["prompt"]], self.params, on_done)
        seconds = (time.monotonic() - started) / max(1, len(completions))
        return {
            "prompt_hash": [str(h) for h in batch["prompt_hash"]],
            "text": [c.text for c in completions],
            "prompt_tokens": [c.prompt_tokens for c in completions],
            "completion_tokens": [c.completion_tokens for c in completions],
            "finish_reason": [c.finish_reason for c in completions],
            "error": [c.error for c in completions],
            "seconds": [seconds] * len(completions),
        }


class _Counter:
    def __init__(self):
        self.count = 0

    def add(self, count: int) -> None:
        self.count += count

    def total(self) -> int:
        return self.count


class FinishedCount:
    """Prompts finished so far, counted by a small Ray actor that the generation actors tell as each prompt
    ends (a call of 128 prompts takes minutes; its answers only come back at its end). `floor`: prompts
    known answered from the calls that came back, in case a restarted actor's count was lost."""

    def __init__(self):
        self.floor = 0
        self.handle = None

    def __enter__(self) -> FinishedCount:
        import ray

        self.handle = ray.remote(num_cpus=0)(_Counter).remote()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.kill(self.handle)

    def total(self) -> int:
        import ray

        try:
            counted = ray.get(self.handle.total.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            counted = 0  # progress only: a slow or lost counter never stops the stage
        return max(self.floor, counted)


def _read_answers(cache: Path) -> dict[str, dict]:
    answers: dict[str, dict] = {}
    for path in sorted(cache.glob("part-*.parquet")) if cache.exists() else []:
        for answer in pq.read_table(path).to_pylist():
            answers[answer["prompt_hash"]] = answer
    return answers
