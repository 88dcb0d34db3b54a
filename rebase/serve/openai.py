"""The OpenAI protocol as `rebase serve` speaks it, without Ray or a web framework: request models and the
limits a request must keep, stop strings, a choice's text released as tokens arrive, and one builder for
the bodies and streamed chunks of both completions and chat completions (and the error body)."""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rebase.config import ServeConfig

# ---------------------------------------------------------------- requests


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
        """The error as OpenAI sends it: `{"error": {message, type, param, code}}`."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def parse_request(raw: bytes, model: type[_Strict]) -> _Strict:
    """A request body as `model`, or a RequestError naming what is wrong with it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "the body is not valid JSON") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise RequestError(400, "the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object")
    try:  # "\ud800" is valid JSON but no text: a lone surrogate cannot be encoded or tokenized
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, "the body holds invalid Unicode (a lone surrogate such as \\ud800)") from None
    except RecursionError:
        raise RequestError(400, "the body is nested too deeply") from None
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


def chat_max_tokens(request: ChatRequest, config: ServeConfig) -> int:
    """The new tokens a chat request may have: its own limit, else 256 (or the server's limit if lower)."""
    return request.max_completion_tokens or request.max_tokens or min(256, config.max_tokens_limit)


# ---------------------------------------------------------------- text as it comes


class TextStream:
    """A choice's text, released as tokens arrive: held back while it could still be cut by a stop
    string or ends in half a character, cut at the first stop string at the end."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int | None) -> str:
        """The text that became certain with this token (often "")."""
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


def finish_reason(stopped: bool, tokens: int, max_tokens: int) -> str:
    """OpenAI's finish reason: "length" when the choice used all its tokens without a stop, else "stop"."""
    return "stop" if stopped or tokens < max_tokens else "length"


# ---------------------------------------------------------------- responses

Kind = Literal["completion", "chat"]
_OBJECTS = {"completion": ("text_completion", "text_completion"), "chat": ("chat.completion", "chat.completion.chunk")}
_ID_PREFIX = {"completion": "cmpl", "chat": "chatcmpl"}


@dataclass(frozen=True)
class Reply:
    """What every body and chunk of one response repeats: its kind, id, creation time and model name."""

    kind: Kind
    id: str
    created: int
    model: str


@dataclass(frozen=True)
class Choice:
    """One decoded choice: its text and why it ended ("stop" or "length")."""

    text: str
    finish_reason: str


def new_reply(kind: Kind, model: str) -> Reply:
    """A fresh response identity: an id unique to it, created now."""
    return Reply(kind, f"{_ID_PREFIX[kind]}-{uuid.uuid4().hex}", int(time.time()), model)


def _envelope(reply: Reply, obj: str, choices: list[dict]) -> dict:
    return {"id": reply.id, "object": obj, "created": reply.created, "model": reply.model, "choices": choices}


def completion_body(reply: Reply, choices: list[Choice], prompt_tokens: int, completion_tokens: int) -> dict:
    """The whole (not streamed) response: a `text_completion` or a `chat.completion` with its usage."""
    entries = []
    for index, choice in enumerate(choices):
        if reply.kind == "chat":
            content = {"message": {"role": "assistant", "content": choice.text}}
        else:
            content = {"text": choice.text}
        entries.append({"index": index, **content, "finish_reason": choice.finish_reason, "logprobs": None})
    body = _envelope(reply, _OBJECTS[reply.kind][0], entries)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    body["usage"] = {**usage, "total_tokens": prompt_tokens + completion_tokens}
    return body


def chunk(reply: Reply, text: str | None, reason: str | None = None) -> dict:
    """One streamed chunk of the only choice: a piece of text and, on the last, the finish reason. For
    chat, `text=None` is the opening chunk that names the assistant's role."""
    if reply.kind == "chat":
        delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
        content = {"delta": delta}
    else:
        content = {"text": text or ""}
    return _envelope(
        reply, _OBJECTS[reply.kind][1], [{"index": 0, **content, "finish_reason": reason, "logprobs": None}]
    )


def event(data: dict) -> str:
    """A server-sent event carrying one JSON chunk."""
    return f"data: {json.dumps(data)}\n\n"


DONE = "data: [DONE]\n\n"  # the event that ends an OpenAI stream


def models_body(names: list[str]) -> dict:
    """`GET /v1/models`: the models served."""
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "rebase"} for name in names],
    }
