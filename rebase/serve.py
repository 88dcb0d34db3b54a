"""`rebase serve`: a student as an OpenAI-compatible endpoint on Ray Serve.

One deployment, `StudentServer`: a FastAPI ingress and the model in each replica, replicas autoscaled by
Ray Serve. Concurrent requests are decoded together: `@serve.batch` collects them and the engine's
stepwise decode loop advances every request of the batch in one forward pass per token, streaming each
request's tokens back as they come (server-sent events with `stream: true`).

Routes (every one but `/healthz` needs `Authorization: Bearer KEY` when $REBASE_API_KEY is set):
    GET  /healthz                                        liveness, no key needed
    GET  /v1/models                                      the one model served
    POST /v1/completions, /v1/chat/completions           the prompt as sent (chat: the model's chat
                                                         template, or the messages' text joined)
    POST /tasks/TASK/v1/completions, .../chat/completions  raw inputs put in the task's prompt format
Requests are validated strictly (unknown fields, wrong types, out-of-range values: 400 with an OpenAI-style
error body; bodies over the limit: 413); the model a request names is only matched against the served
name, never loaded, so no request can make the server open a path or run code.
"""

# No `from __future__ import annotations` here: the deployment class travels to its replicas by value, and
# FastAPI must see the routes' annotations (Request) as objects, not as names to look up there.
import asyncio
import hmac
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rebase.config import ServeConfig
from rebase.errors import RebaseError
from rebase.models import resolve_model
from rebase.task import STUDENT_STOP

# ---------------------------------------------------------------- requests (plain pydantic, no Ray)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Stop = str | list[str] | None


class _Sampling(_Strict):
    """What completions and chat requests share: how to sample, how many choices, when to stop."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: Stop = None
    seed: int | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def parse_request(raw: bytes, model: type[_Strict]) -> _Strict:
    """A request body as `model`, or a RequestError naming what is wrong with it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise RequestError(400, f"{param or 'body'}: {first['msg']}", param=param) from None


def stop_strings(stop: Stop) -> list[str]:
    """The stop strings of a request (at most 4, each 1 to 64 characters)."""
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > 4 or any(not 1 <= len(s) <= 64 for s in strings):
        raise RequestError(400, "stop: at most 4 strings of 1 to 64 characters", param="stop")
    return strings


def check_limits(config: ServeConfig, max_tokens: int, choices: int, top_p: float) -> None:
    """Limits a request must keep, whatever the schema allows."""
    if max_tokens > config.max_tokens_limit:
        raise RequestError(400, f"max_tokens: at most {config.max_tokens_limit}", param="max_tokens")
    if choices > config.max_choices:
        raise RequestError(400, f"prompts x n: at most {config.max_choices} choices per request", param="n")
    if top_p != 1.0:
        raise RequestError(400, "top_p: only 1.0 is supported (use temperature)", param="top_p")


# ---------------------------------------------------------------- decoding: text as it comes


@dataclass
class Job:
    """One choice to decode: prompt token ids and its own settings."""

    ids: list[int]
    max_tokens: int
    temperature: float
    stop: list[str]


class TextStream:
    """A choice's text, released as tokens arrive: held back while it could still be cut by a stop
    string or ends in half a character, cut at the first stop string at the end."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int | None) -> str:
        if token is not None:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop and any(s in text for s in self.stop):
            return ""  # the end is near: `finish` cuts and releases the rest
        ready = len(text) - self.hold if self.stop else len(text)
        while ready > self.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        piece, self.sent = text[self.sent : max(ready, self.sent)], max(ready, self.sent)
        return piece

    def finish(self) -> tuple[str, bool]:
        """The rest of the text, and whether a stop string ended it."""
        from rebase.generate.engines import cut_at_stop

        text, stopped = cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop)
        piece = text[self.sent :] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return piece, stopped


# ---------------------------------------------------------------- the Ray Serve application


def _served_name(config: ServeConfig) -> str:
    from pathlib import Path

    if config.name:
        return config.name
    path = Path(config.model).expanduser()
    return path.resolve().name if path.is_dir() else config.model


def build_app(args: dict):
    """The Serve application for a ServeConfig's fields (what `serve run jobs/serve.yaml` imports too)."""

    from rebase.config import build_config

    config = args if isinstance(args, ServeConfig) else build_config(ServeConfig, args, "serve config")
    from rebase.models import canonical_model_name

    # Replicas get the task itself and an absolute model path: their working directory is not ours.
    settings = config.model_dump(mode="json")
    settings["model"] = canonical_model_name(config.model)
    settings["name"] = _served_name(config)
    if config.task is not None:
        from rebase.task import load_task

        settings["task_spec"] = load_task(config.task).model_dump(mode="json")  # a bad file fails here, once
    if config.engine == "vllm":
        return _vllm_app(config, settings)
    options = {
        "autoscaling_config": {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        },
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 1},
    }
    key = os.environ.get(config.api_key_env)
    if key:  # replicas on other nodes do not see this shell's environment
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {config.api_key_env: key}}
    if config.max_replicas == config.min_replicas:
        options.pop("autoscaling_config")
        options["num_replicas"] = config.min_replicas
    if _cluster_gpus() > 0:
        options["ray_actor_options"]["num_gpus"] = 1
    return _deployment().options(**options).bind(settings)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _vllm_app(config: ServeConfig, settings: dict):
    """Ray Serve LLM's OpenAI app (vLLM, one GPU per replica) for the same model, name and replica counts.
    Its routes are Ray Serve LLM's: no task routes, and its own request limits. Not run in CI (no GPU)."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app

        llm = LLMConfig(
            model_loading_config={"model_id": settings["name"], "model_source": str(resolve_model(config.model))},
            deployment_config={
                "autoscaling_config": {
                    "min_replicas": config.min_replicas,
                    "max_replicas": config.max_replicas,
                    "target_ongoing_requests": config.target_ongoing_requests,
                },
                "max_ongoing_requests": config.max_ongoing_requests,
            },
        )
        return build_openai_app({"llm_configs": [llm]})
    except ImportError as error:
        raise RebaseError(f"engine vllm needs Ray Serve LLM with vLLM on the GPU nodes ({error})") from None


_DEPLOYMENT = None


def _deployment():
    """The deployment class, built once on first use (Ray Serve and FastAPI load only when serving)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is None:
        _DEPLOYMENT = _define_deployment()
    return _DEPLOYMENT


def _define_deployment():
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
    from starlette.exceptions import HTTPException

    app = FastAPI(title="rebase student", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _refused(_, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def _http(_, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(RequestError(error.status_code, str(error.detail), kind).body(), error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, error: RequestValidationError):
        first = (error.errors() or [{}])[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse(RequestError(400, f"invalid request: {where} {first.get('msg', '')}").body(), 400)

    @serve.deployment(name="StudentServer")
    @serve.ingress(app)
    class StudentServer:
        """The student in this replica, its routes, and the batch that decodes concurrent requests."""

        def __init__(self, settings: dict):
            import torch

            from rebase.generate.engines import TransformersEngine
            from rebase.task import TaskSpec

            task_spec = settings.pop("task_spec", None)
            self.config = ServeConfig.model_validate(settings)
            gpu = torch.cuda.is_available()
            threads = None if gpu else (self.config.threads or os.cpu_count() or 1)
            self.engine = TransformersEngine(
                str(resolve_model(self.config.model)), batch_size=self.config.max_batch_size, threads=threads
            )
            self.tokenizer = self.engine.tokenizer
            self.name = _served_name(self.config)
            self.task = TaskSpec.model_validate(task_spec) if task_spec is not None else None
            self.few_shot = bool(self.config.few_shot) if self.config.few_shot is not None else self._trained_few_shot()
            self.key = os.environ.get(self.config.api_key_env) or None
            self.batch_sizes: list[int] = []
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")  # one forward at a time
            self.decode.set_max_batch_size(self.config.max_batch_size)
            self.decode.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

        def _trained_few_shot(self) -> bool:
            from pathlib import Path

            stats = Path(self.config.model).expanduser() / "stats.json"
            if stats.is_file():
                return bool(json.loads(stats.read_text()).get("config", {}).get("few_shot"))
            return False

        # -------------------------------------------------- batching

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.1)  # both set from the config in __init__
        async def decode(self, jobs: list[Job]):
            """Every job of the batch advanced by one token per forward pass; yields one item per job
            per step: (token or None, finished), or StopIteration once a job is done."""
            from rebase.generate.engines import GenerationParams

            self.batch_sizes.append(len(jobs))
            rows = [GenerationParams(j.max_tokens, j.temperature, None, j.stop or None) for j in jobs]
            steps = self.engine.steps([j.ids for j in jobs], rows)
            done = [False] * len(jobs)
            loop = asyncio.get_running_loop()
            while not all(done):
                events = await loop.run_in_executor(self.pool, next, steps, None)
                if events is None:
                    break
                step: list = [StopIteration if d else (None, False) for d in done]
                for row, token, finished in events:
                    step[row] = (token, finished)
                yield step
                finished_now = [row for row, _, finished in events if finished]
                if finished_now:  # end those callers' iterations now, not one decoding step later
                    for row in finished_now:
                        done[row] = True
                    yield [StopIteration if d else (None, False) for d in done]

        def batches(self) -> list[int]:
            """The sizes of the batches this replica decoded (for tests and benchmarks)."""
            return list(self.batch_sizes)

        async def _choice(self, job: Job):
            """Text pieces of one choice as they come, then ("", finish_reason)."""
            text = TextStream(self.tokenizer, job.stop)
            last = None
            count = 0
            async for token, finished in self.decode(job):
                if token is None and not finished:
                    continue  # a step that did not advance this choice
                last = token
                count += token is not None
                piece = text.add(token)
                if piece:
                    yield piece, None
            rest, stopped = text.finish()
            reason = "stop" if stopped or last is None or count < job.max_tokens else "length"
            yield rest, reason

        # -------------------------------------------------- requests

        def _authorise(self, request: Request) -> None:
            if self.key is None:
                return
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                raise RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")

        def _check_task(self, task: str | None) -> None:
            if task is not None and (self.task is None or task != self.task.name):
                raise RequestError(404, f"no task '{task}' is served here", "not_found_error")

        async def _body(self, request: Request, model: type[_Strict], task: str | None):
            self._authorise(request)
            self._check_task(task)
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
                raise RequestError(413, f"the body is larger than {self.config.max_body_bytes} bytes")
            raw = b""
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > self.config.max_body_bytes:
                    raise RequestError(413, f"the body is larger than {self.config.max_body_bytes} bytes")
            body = parse_request(raw, model)
            if body.model != self.name:
                raise RequestError(
                    404, f"model '{body.model}' is not served here; GET /v1/models", "not_found_error", "model"
                )
            return body

        def _ids(self, text: str) -> list[int]:
            ids = self.tokenizer(text)["input_ids"]
            if len(ids) > self.config.max_prompt_tokens:
                raise RequestError(
                    400, f"prompt: {len(ids)} tokens, at most {self.config.max_prompt_tokens}", param="prompt"
                )
            return ids

        def _task_prompt(self, text: str) -> str:
            from rebase.task import student_prompt

            return student_prompt(self.task, text, self.few_shot)

        def _chat_ids(self, messages: list[ChatMessage], task: str | None) -> list[int]:
            if task is not None:
                users = [m.content for m in messages if m.role == "user"]
                if not users:
                    raise RequestError(400, "messages: a task route needs a user message (the input)", param="messages")
                return self._ids(self._task_prompt(users[-1]))
            if self.tokenizer.chat_template:
                turns = [{"role": m.role, "content": m.content} for m in messages]
                text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) > self.config.max_prompt_tokens:
                    raise RequestError(
                        400, f"messages: {len(ids)} tokens, at most {self.config.max_prompt_tokens}", param="messages"
                    )
                return ids
            return self._ids("\n\n".join(m.content for m in messages))

        async def _run(self, jobs: list[Job]) -> list[tuple[str, str]]:
            async def collect(job: Job) -> tuple[str, str]:
                pieces, reason = [], "length"
                async for piece, finish in self._choice(job):
                    pieces.append(piece)
                    reason = finish or reason
                return "".join(pieces), reason

            return await asyncio.gather(*(collect(job) for job in jobs))

        def _usage(self, jobs: list[Job], texts: list[str]) -> dict:
            prompt = sum(len(j.ids) for j in jobs)
            completion = sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        async def _completions(self, request: Request, task: str | None):
            body = await self._body(request, CompletionRequest, task)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not prompts:
                raise RequestError(400, "prompt: must not be empty", param="prompt")
            check_limits(self.config, body.max_tokens, len(prompts) * body.n, body.top_p)
            stop = stop_strings(body.stop) + (STUDENT_STOP if task is not None else [])
            texts = [self._task_prompt(p) if task is not None else p for p in prompts]
            jobs = [Job(self._ids(t), body.max_tokens, body.temperature, stop) for t in texts for _ in range(body.n)]
            created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
            if body.stream:
                if len(jobs) > 1:
                    raise RequestError(400, "stream: one prompt and n = 1 per streamed request", param="stream")

                def chunk(text: str, reason: str | None) -> dict:
                    choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
                    return {
                        "id": ident,
                        "object": "text_completion",
                        "created": created,
                        "model": self.name,
                        "choices": [choice],
                    }

                return self._stream(jobs[0], chunk, first=None)
            results = await self._run(jobs)
            choices = [
                {"index": n, "text": text, "finish_reason": reason, "logprobs": None}
                for n, (text, reason) in enumerate(results)
            ]
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": self.name,
                "choices": choices,
                "usage": self._usage(jobs, [t for t, _ in results]),
            }

        async def _chat(self, request: Request, task: str | None):
            body = await self._body(request, ChatRequest, task)
            max_tokens = body.max_completion_tokens or body.max_tokens or min(256, self.config.max_tokens_limit)
            check_limits(self.config, max_tokens, body.n, body.top_p)
            stop = stop_strings(body.stop) + (STUDENT_STOP if task is not None else [])
            ids = self._chat_ids(body.messages, task)
            jobs = [Job(ids, max_tokens, body.temperature, stop) for _ in range(body.n)]
            created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
            if body.stream:
                if len(jobs) > 1:
                    raise RequestError(400, "stream: n = 1 per streamed request", param="stream")

                def chunk(text: str | None, reason: str | None) -> dict:
                    delta = (
                        {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                    )
                    choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
                    return {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": self.name,
                        "choices": [choice],
                    }

                return self._stream(jobs[0], chunk, first=chunk(None, None))
            results = await self._run(jobs)
            choices = [
                {
                    "index": n,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
                for n, (text, reason) in enumerate(results)
            ]
            return {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": self.name,
                "choices": choices,
                "usage": self._usage(jobs, [t for t, _ in results]),
            }

        def _stream(self, job: Job, chunk, first: dict | None):
            async def events():
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                async for piece, reason in self._choice(job):
                    if piece or reason:
                        yield f"data: {json.dumps(chunk(piece, reason))}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        # -------------------------------------------------- routes

        @app.get("/healthz")
        def healthz(self):
            return {"status": "ok"}

        @app.get("/v1/models")
        @app.get("/tasks/{task}/v1/models")
        async def models(self, request: Request, task: str | None = None):
            self._authorise(request)
            self._check_task(task)
            model = {"id": self.name, "object": "model", "created": 0, "owned_by": "rebase"}
            return {"object": "list", "data": [model]}

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._completions(request, None)

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request):
            return await self._chat(request, None)

        @app.post("/tasks/{task}/v1/completions")
        async def task_completions(self, task: str, request: Request):
            return await self._completions(request, task)

        @app.post("/tasks/{task}/v1/chat/completions")
        async def task_chat(self, task: str, request: Request):
            return await self._chat(request, task)

    return StudentServer


# ---------------------------------------------------------------- `rebase serve`


def serve_student(config: ServeConfig, ready=None) -> None:
    """Deploy the student on the local (or RAY_ADDRESS) Ray and block until Ctrl-C; `ready(url)` is
    called once the endpoint answers."""
    from ray import serve

    from rebase.ray_setup import ensure_ray

    resolve_model(config.model)  # a model that cannot be found offline: one line, before Ray starts
    ensure_ray()
    application = build_app(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application, name="rebase", route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}/v1"
    print(f"serving {_served_name(config)} at {url} (Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(url)
    try:
        while True:
            time.sleep(1)
    finally:
        serve.shutdown()
