"""A real OpenAI-compatible HTTP server on loopback for the `openai` engine's tests (until `rebase serve`
exists): FastAPI under uvicorn in a thread, chat completions answered by the real built-in teacher, with
failures injected on request (status codes) to exercise the client's retry path. Not a fake of the model:
a small real server; the only thing it leaves out is everything a production server adds."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse

from rebase.generate.engines import GenerationParams, TransformersEngine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "code": status}}, status_code=status)


class ChatServer:
    """Serves `model_name` on 127.0.0.1; `fail_with` holds status codes for the next generation requests
    (a 1-token request, the client's start-up check, is never failed), answered with a `Retry-After` of
    `retry_after` seconds when set; `requests` counts every request and `times` holds when each generation
    request arrived (time.monotonic), to count requests per window."""

    def __init__(self, engine: TransformersEngine, model_name: str = "teacher", api_key: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.fail_with: list[int] = []
        self.retry_after: float | None = None
        self.times: list[float] = []
        self.requests = 0
        self.generation_requests = 0
        self._lock = threading.Lock()  # the counters (held for no time: the event loop takes it)
        self._model = threading.Lock()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = FastAPI()
        app.post("/v1/chat/completions")(self._chat)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _generate(self, prompt: str, params: GenerationParams):
        with self._model:  # one generation at a time on the shared model
            [completion] = self.engine.generate([prompt], params)
        return completion

    async def _chat(self, request: Request, authorization: str | None = Header(None)):
        body = await request.json()
        with self._lock:
            self.requests += 1
        if self.api_key and authorization != f"Bearer {self.api_key}":
            return _error(401, "invalid API key")
        if body.get("model") != self.model_name:
            return _error(404, f"model {body.get('model')} not found")
        max_tokens = int(body.get("max_tokens") or 64)
        if max_tokens > 1:
            with self._lock:
                self.generation_requests += 1
                self.times.append(time.monotonic())
                status = self.fail_with.pop(0) if self.fail_with else None
            if status:
                response = _error(status, "injected failure")
                if self.retry_after is not None:
                    response.headers["retry-after"] = str(self.retry_after)
                return response
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
        stop = body.get("stop")
        prompt = body["messages"][-1]["content"]
        params = GenerationParams(
            max_tokens, float(body.get("temperature") or 0), schema, [stop] if isinstance(stop, str) else stop
        )
        # in a thread, so the server keeps taking (and timing) requests while one generates
        completion = await asyncio.to_thread(self._generate, prompt, params)
        return {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }
