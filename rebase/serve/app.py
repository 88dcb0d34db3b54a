"""The Ray Serve application of `rebase serve`: a module-level FastAPI app and the `StudentServer`
deployment that holds the student in each replica, decodes concurrent requests together (`@serve.batch`
over the engine's stepwise loop) and answers with the bodies `rebase.serve.openai` builds."""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request, str) to
# know what to pass each route, and must see them as objects, not as strings to resolve.
import asyncio
import hmac
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from rebase.config import ServeConfig
from rebase.models import resolve_model, student_stats
from rebase.serve.openai import (
    DONE,
    ChatMessage,
    ChatRequest,
    Choice,
    CompletionRequest,
    Reply,
    RequestError,
    TextStream,
    chat_max_tokens,
    check_limits,
    chunk,
    completion_body,
    event,
    finish_reason,
    models_body,
    new_reply,
    parse_request,
    stop_strings,
)
from rebase.task import STUDENT_STOP, TaskSpec, student_prompt

app = FastAPI(title="rebase student", docs_url=None, redoc_url=None, openapi_url=None)
CONCURRENT_BATCHES = 4  # batches decoding at once in a replica (see StudentServer.decode)


@app.exception_handler(RequestError)
async def _refused(_: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@app.exception_handler(HTTPException)
async def _http(_: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(RequestError(error.status_code, str(error.detail), kind).body(), error.status_code)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    first = (error.errors() or [{}])[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return JSONResponse(RequestError(400, f"invalid request: {where} {first.get('msg', '')}").body(), 400)


@dataclass
class Job:
    """One choice to decode: prompt token ids and its own settings."""

    ids: list[int]
    max_tokens: int
    temperature: float
    stop: list[str]
    cancelled: bool = False  # set when nobody reads the choice any more (the client went away)


@serve.deployment(name="StudentServer")
@serve.ingress(app)
class StudentServer:
    """The student in this replica, its routes, and the batch that decodes concurrent requests."""

    def __init__(self, config: ServeConfig, task: TaskSpec | None):
        import torch

        from rebase.generate.engines import TransformersEngine

        self.config, self.task, self.name = config, task, config.name
        threads = None if torch.cuda.is_available() else (config.threads or os.cpu_count() or 1)
        self.engine = TransformersEngine(
            str(resolve_model(config.model)), config.max_batch_size, threads, dtype=config.dtype
        )
        self.tokenizer = self.engine.tokenizer
        trained = student_stats(config.model).get("config", {}).get("few_shot")
        self.few_shot = bool(config.few_shot if config.few_shot is not None else trained)
        self.key = os.environ.get(config.api_key_env) or None
        self.batch_sizes: list[int] = []
        self.cancelled = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")  # one forward at a time
        self.decode.set_max_batch_size(config.max_batch_size)
        self.decode.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    # -------------------------------------------------- batching

    # Several batches decode at once: their forward passes take turns on the one decode thread, so a short
    # request that arrives while a long batch runs starts at once instead of waiting for that batch to end.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.1, max_concurrent_batches=CONCURRENT_BATCHES)
    async def decode(self, jobs: list[Job]):
        """Every job of the batch advanced by one token per forward pass; yields one item per job per
        step: (token or None, finished), or StopIteration once a job is done. A job whose caller went
        away leaves the batch before the next pass. (Batch size and wait are set from the config.)"""
        from rebase.generate.engines import GenerationParams

        self.batch_sizes.append(len(jobs))
        rows = [GenerationParams(j.max_tokens, j.temperature, None, j.stop or None) for j in jobs]
        batch = self.engine.batch([j.ids for j in jobs], rows)
        steps = batch.steps()
        done = [False] * len(jobs)
        loop = asyncio.get_running_loop()
        while not all(done):
            for row, job in enumerate(jobs):
                if job.cancelled and not done[row]:
                    batch.cancel(row)
                    done[row] = True
                    self.cancelled += 1
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

    def cancellations(self) -> int:
        """How many choices stopped decoding because their client went away (for tests and benchmarks)."""
        return self.cancelled

    async def _choice(self, job: Job) -> AsyncIterator[tuple[str, str | None]]:
        """Text pieces of one choice as they come, then (the rest, finish reason). When the reader stops
        early (a client that disconnected, streaming or not), the job is marked so decoding stops too."""
        text = TextStream(self.tokenizer, job.stop)
        count = 0
        try:
            async for token, finished in self.decode(job):
                if token is None and not finished:
                    continue  # a step that did not advance this choice
                count += token is not None
                piece = text.add(token)
                if piece:
                    yield piece, None
            rest, stopped = text.finish()
            yield rest, finish_reason(stopped, count, job.max_tokens)
        finally:
            job.cancelled = True  # no effect once the job is done

    async def _run(self, jobs: list[Job]) -> list[Choice]:
        async def collect(job: Job) -> Choice:
            pieces, reason = [], "length"
            async for piece, finish in self._choice(job):
                pieces.append(piece)
                reason = finish or reason
            return Choice("".join(pieces), reason)

        return await asyncio.gather(*(collect(job) for job in jobs))

    async def _respond(self, reply: Reply, jobs: list[Job], stream: bool):
        """The whole body, or (stream) server-sent chunks of the one job's text as it comes."""
        if not stream:
            choices = await self._run(jobs)
            completion = sum(len(self.tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in choices)
            return completion_body(reply, choices, sum(len(j.ids) for j in jobs), completion)
        if len(jobs) > 1:
            raise RequestError(400, "stream: one prompt and n = 1 per streamed request", param="stream")

        async def events():
            if reply.kind == "chat":
                yield event(chunk(reply, None))
            async for piece, reason in self._choice(jobs[0]):
                if piece or reason:
                    yield event(chunk(reply, piece, reason))
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    # -------------------------------------------------- requests

    def _authorise(self, request: Request) -> None:
        size = sum(len(name) + len(value) for name, value in request.headers.raw)
        if size > self.config.max_header_bytes:
            raise RequestError(431, f"the request headers are larger than {self.config.max_header_bytes} bytes")
        if self.key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
            raise RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")

    def _check_task(self, task: str | None) -> None:
        if task is not None and (self.task is None or task != self.task.name):
            raise RequestError(404, f"no task '{task}' is served here", "not_found_error")

    async def _body(self, request: Request, model: type, task: str | None):
        self._authorise(request)
        self._check_task(task)
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise RequestError(413, f"the body is larger than {limit} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise RequestError(413, f"the body is larger than {limit} bytes")
        body = parse_request(raw, model)
        if body.model != self.name:
            raise RequestError(
                404, f"model '{body.model}' is not served here; GET /v1/models", "not_found_error", "model"
            )
        return body

    def _ids(self, text: str, param: str = "prompt", special: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > self.config.max_prompt_tokens:
            raise RequestError(400, f"{param}: {len(ids)} tokens, at most {self.config.max_prompt_tokens}", param=param)
        return ids

    def _stop(self, request: CompletionRequest | ChatRequest, task: str | None) -> list[str]:
        return stop_strings(request.stop) + (STUDENT_STOP if task is not None else [])

    def _chat_ids(self, messages: list[ChatMessage], task: str | None) -> list[int]:
        if task is not None:
            users = [m.content for m in messages if m.role == "user"]
            if not users:
                raise RequestError(400, "messages: a task route needs a user message (the input)", param="messages")
            return self._ids(student_prompt(self.task, users[-1], self.few_shot))
        if self.tokenizer.chat_template:
            turns = [{"role": m.role, "content": m.content} for m in messages]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return self._ids(text, param="messages", special=False)  # the template wrote the special tokens
        return self._ids("\n\n".join(m.content for m in messages))

    async def _completions(self, request: Request, task: str | None):
        body = await self._body(request, CompletionRequest, task)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise RequestError(400, "prompt: must not be empty", param="prompt")
        check_limits(self.config, body.max_tokens, len(prompts) * body.n, body.top_p)
        stop = self._stop(body, task)
        texts = [student_prompt(self.task, p, self.few_shot) if task is not None else p for p in prompts]
        jobs = [Job(self._ids(t), body.max_tokens, body.temperature, stop) for t in texts for _ in range(body.n)]
        return await self._respond(new_reply("completion", self.name), jobs, body.stream)

    async def _chat(self, request: Request, task: str | None):
        body = await self._body(request, ChatRequest, task)
        max_tokens = chat_max_tokens(body, self.config)
        check_limits(self.config, max_tokens, body.n, body.top_p)
        stop = self._stop(body, task)
        ids = self._chat_ids(body.messages, task)
        jobs = [Job(ids, max_tokens, body.temperature, stop) for _ in range(body.n)]
        return await self._respond(new_reply("chat", self.name), jobs, body.stream)

    # -------------------------------------------------- routes

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/tasks/{task}/v1/models")
    async def models(self, request: Request, task: str | None = None) -> dict:
        self._authorise(request)
        self._check_task(task)
        return models_body(self.name)

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
