"""The Ray Serve application of `rebase serve`: a module-level FastAPI app and the `StudentServer`
deployment that holds the students in each replica (one model per group: a student's own, or a base shared
by LoRA students, each decoding with its adapter), decodes concurrent requests together (`@serve.batch` over
the engines' stepwise loops) and answers with the bodies `rebase.serve.openai` builds."""

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
from rebase.models import resolve_model
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
from rebase.serve.students import Group, Student
from rebase.task import STUDENT_STOP, student_prompt

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
class Served:
    """A student in this replica: what clients know of it, the engine holding its model, its adapter."""

    student: Student
    engine: object  # a TransformersEngine
    adapter: str  # BASE_ADAPTER when its model is the engine's own

    @property
    def tokenizer(self):
        return self.engine.tokenizer


@dataclass
class Job:
    """One choice to decode: its student, prompt token ids and its own settings."""

    served: Served
    ids: list[int]
    max_tokens: int
    temperature: float
    stop: list[str]
    cancelled: bool = False  # set when nobody reads the choice any more (the client went away)


class Batches:
    """The jobs of one serve batch as one continuous batch per engine they use: `step` advances every one by
    one forward pass and returns the events by job index, None once all are done."""

    def __init__(self, jobs: list[Job]):
        from rebase.generate.engines import GenerationParams

        by_engine: dict[int, list[int]] = {}
        for index, job in enumerate(jobs):
            by_engine.setdefault(id(job.served.engine), []).append(index)
        self.parts = []  # (job indices, batch, its steps)
        for indices in by_engine.values():
            engine = jobs[indices[0]].served.engine
            rows = [
                GenerationParams(jobs[i].max_tokens, jobs[i].temperature, None, jobs[i].stop or None) for i in indices
            ]
            adapters = [jobs[i].served.adapter for i in indices] if engine.adapters else None
            batch = engine.batch([jobs[i].ids for i in indices], rows, adapters)
            self.parts.append((indices, batch, batch.steps()))
        self.where = {
            index: (part, row) for part, (indices, _, _) in enumerate(self.parts) for row, index in enumerate(indices)
        }
        self.running = set(range(len(self.parts)))

    def cancel(self, index: int) -> None:
        part, row = self.where[index]
        self.parts[part][1].cancel(row)

    def step(self) -> list[tuple[int, int | None, bool]] | None:
        if not self.running:
            return None
        events = []
        for part in sorted(self.running):
            indices, _, steps = self.parts[part]
            stepped = next(steps, None)
            if stepped is None:
                self.running.discard(part)
                continue
            events.extend((indices[row], token, finished) for row, token, finished in stepped)
        return events if self.running or events else None


@serve.deployment(name="StudentServer")
@serve.ingress(app)
class StudentServer:
    """The students in this replica (their models, one per group), the routes, and the batches that decode
    concurrent requests."""

    def __init__(self, config: ServeConfig, students: list[Student], groups: list[Group]):
        import torch

        from rebase.generate.engines import BASE_ADAPTER, TransformersEngine

        self.config = config
        threads = None if torch.cuda.is_available() else (config.threads or os.cpu_count() or 1)
        self.served: dict[str, Served] = {}
        by_name = {student.name: student for student in students}
        for group in groups:
            engine = TransformersEngine(
                str(resolve_model(group.model)),
                config.max_batch_size,
                threads,
                dtype=config.dtype,
                adapters=group.adapters or None,
            )
            for name in group.students:
                self.served[name] = Served(by_name[name], engine, name if group.adapters else BASE_ADAPTER)
        self.names = [student.name for student in students]  # in the order given
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
        """Every job of the batch advanced by one token per forward pass (one pass per model in memory the
        batch uses; students sharing a base share its passes); yields one item per job per step: (token or
        None, finished), or StopIteration once a job is done. A job whose caller went away leaves the batch
        before the next pass. (Batch size and wait are set from the config.)"""
        self.batch_sizes.append(len(jobs))
        batches = Batches(jobs)
        done = [False] * len(jobs)
        loop = asyncio.get_running_loop()
        while not all(done):
            for row, job in enumerate(jobs):
                if job.cancelled and not done[row]:
                    batches.cancel(row)
                    done[row] = True
                    self.cancelled += 1
            events = await loop.run_in_executor(self.pool, batches.step)
            if events is None:
                break
            step: list = [StopIteration if d else (None, False) for d in done]
            for row, token, finished in events:  # at most one per job: a step is one forward pass
                step[row] = (token, finished)
            yield step
            finished_now = [row for row, _, finished in events if finished]
            if finished_now:  # end those callers' iterations now, not one decoding step later
                for row in finished_now:
                    done[row] = True
                yield [StopIteration if d else (None, False) for d in done]

    def loaded(self) -> list[dict]:
        """The models this replica holds in memory and the students each serves (for tests and benchmarks)."""
        engines: dict[int, dict] = {}
        for name, served in self.served.items():
            if id(served.engine) not in engines:
                model = served.engine.model
                engines[id(served.engine)] = {
                    "students": [],
                    "adapters": list(served.engine.adapters),
                    "parameters": sum(p.numel() for p in model.parameters()),
                }
            engines[id(served.engine)]["students"].append(name)
        return list(engines.values())

    def batches(self) -> list[int]:
        """The sizes of the batches this replica decoded (for tests and benchmarks)."""
        return list(self.batch_sizes)

    def cancellations(self) -> int:
        """How many choices stopped decoding because their client went away (for tests and benchmarks)."""
        return self.cancelled

    async def _choice(self, job: Job) -> AsyncIterator[tuple[str, str | None]]:
        """Text pieces of one choice as they come, then (the rest, finish reason). When the reader stops
        early (a client that disconnected, streaming or not), the job is marked so decoding stops too."""
        text = TextStream(job.served.tokenizer, job.stop)
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
            tokenizer = jobs[0].served.tokenizer
            completion = sum(len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in choices)
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

    def _for_task(self, task: str | None) -> list[str]:
        """The names served on a route: every one, or (a task route) those of that task; none is a 404."""
        if task is None:
            return self.names
        names = [n for n in self.names if self.served[n].student.task and self.served[n].student.task.name == task]
        if not names:
            raise RequestError(404, f"no task '{task}' is served here", "not_found_error")
        return names

    async def _body(self, request: Request, model: type, task: str | None):
        """The request's body and the student it names (one served on this route, else a 404)."""
        self._authorise(request)
        names = self._for_task(task)
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
        if body.model not in names:
            where = f"for task '{task}'" if task is not None and body.model in self.served else "here"
            raise RequestError(
                404, f"model '{body.model}' is not served {where}; GET /v1/models", "not_found_error", "model"
            )
        return body, self.served[body.model]

    def _ids(self, served: Served, text: str, param: str = "prompt", special: bool = True) -> list[int]:
        ids = served.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > self.config.max_prompt_tokens:
            raise RequestError(400, f"{param}: {len(ids)} tokens, at most {self.config.max_prompt_tokens}", param=param)
        return ids

    def _stop(self, request: CompletionRequest | ChatRequest, task: str | None) -> list[str]:
        return stop_strings(request.stop) + (STUDENT_STOP if task is not None else [])

    def _chat_ids(self, served: Served, messages: list[ChatMessage], task: str | None) -> list[int]:
        if task is not None:
            users = [m.content for m in messages if m.role == "user"]
            if not users:
                raise RequestError(400, "messages: a task route needs a user message (the input)", param="messages")
            student = served.student
            return self._ids(served, student_prompt(student.task, users[-1], student.few_shot))
        if served.tokenizer.chat_template:
            turns = [{"role": m.role, "content": m.content} for m in messages]
            text = served.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return self._ids(served, text, param="messages", special=False)  # the template wrote the special tokens
        return self._ids(served, "\n\n".join(m.content for m in messages))

    async def _completions(self, request: Request, task: str | None):
        body, served = await self._body(request, CompletionRequest, task)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise RequestError(400, "prompt: must not be empty", param="prompt")
        check_limits(self.config, body.max_tokens, len(prompts) * body.n, body.top_p)
        stop = self._stop(body, task)
        student = served.student
        texts = [student_prompt(student.task, p, student.few_shot) if task is not None else p for p in prompts]
        jobs = [
            Job(served, self._ids(served, t), body.max_tokens, body.temperature, stop)
            for t in texts
            for _ in range(body.n)
        ]
        return await self._respond(new_reply("completion", student.name), jobs, body.stream)

    async def _chat(self, request: Request, task: str | None):
        body, served = await self._body(request, ChatRequest, task)
        max_tokens = chat_max_tokens(body, self.config)
        check_limits(self.config, max_tokens, body.n, body.top_p)
        stop = self._stop(body, task)
        ids = self._chat_ids(served, body.messages, task)
        jobs = [Job(served, ids, max_tokens, body.temperature, stop) for _ in range(body.n)]
        return await self._respond(new_reply("chat", served.student.name), jobs, body.stream)

    # -------------------------------------------------- routes

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/tasks/{task}/v1/models")
    async def models(self, request: Request, task: str | None = None) -> dict:
        self._authorise(request)
        return models_body(self._for_task(task))

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
