"""`rebase/serve/openai.py` without Ray: strict request parsing, limits, stop strings, the text a choice
releases as tokens arrive, and the exact JSON of OpenAI's completion, chat.completion, chunk and error
objects."""

from __future__ import annotations

import json
import time

import pytest

from rebase.config import ServeConfig
from rebase.serve.openai import (
    DONE,
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


def test_requests_are_parsed_strictly():
    body = parse_request(b'{"model": "m", "prompt": "hi", "max_tokens": 3}', CompletionRequest)
    assert body.prompt == "hi" and body.max_tokens == 3 and body.temperature == 0.0 and body.n == 1
    cases = [
        (b"{not json", "not valid JSON", None),
        (b"\xff\xfe", "not valid JSON", None),
        (b"[1, 2]", "must be a JSON object", None),
        (b'{"model": "m"}', "prompt", "prompt"),
        (b'{"model": "m", "prompt": "x", "max_tokens": "5"}', "max_tokens", "max_tokens"),
        (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "max_tokens", "max_tokens"),
        (b'{"model": "m", "prompt": "x", "extra": 1}', "extra", "extra"),
        (b'{"model": "m", "prompt": 7}', "prompt", "prompt"),
        # seen in a probe as plain-text 500s: 10,000-level nesting and a lone surrogate in the prompt
        (b'{"model": "m", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply", None),
        (b'{"model": "m", "prompt": "hi \\ud800 there"}', "invalid Unicode", None),
    ]
    for raw, where, param in cases:
        with pytest.raises(RequestError) as refused:
            parse_request(raw, CompletionRequest)
        assert refused.value.status == 400 and where in refused.value.message
        assert (refused.value.param or "").split(".")[0] == (param or "")  # a union adds its member: prompt.str
    with pytest.raises(RequestError, match="messages"):
        parse_request(b'{"model": "m", "messages": []}', ChatRequest)
    with pytest.raises(RequestError) as refused:
        parse_request(b'{"model": "m", "messages": [{"role": "root", "content": "x"}]}', ChatRequest)
    assert refused.value.param == "messages.0.role"


def test_stop_strings_and_limits():
    assert stop_strings(None) == [] and stop_strings("\n") == ["\n"] and stop_strings(["a", "b"]) == ["a", "b"]
    for bad in (["a"] * 5, [""], ["x" * 65]):
        with pytest.raises(RequestError, match="stop"):
            stop_strings(bad)
    config = ServeConfig(model="m", max_tokens_limit=10, max_choices=2)
    check_limits(config, 10, 2, 1.0)
    for args, param in (((11, 1, 1.0), "max_tokens"), ((5, 3, 1.0), "n"), ((5, 1, 0.5), "top_p")):
        with pytest.raises(RequestError) as refused:
            check_limits(config, *args)
        assert refused.value.status == 400 and refused.value.param == param
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(model="m", min_replicas=3, max_replicas=2)


def test_chat_max_tokens_prefers_the_newer_field():
    config = ServeConfig(model="m", max_tokens_limit=100)
    messages = [{"role": "user", "content": "hi"}]
    assert chat_max_tokens(ChatRequest(model="m", messages=messages), config) == 100  # under the 256 default
    assert chat_max_tokens(ChatRequest(model="m", messages=messages), ServeConfig(model="m")) == 256
    assert chat_max_tokens(ChatRequest(model="m", messages=messages, max_tokens=7), config) == 7
    both = ChatRequest(model="m", messages=messages, max_tokens=7, max_completion_tokens=9)
    assert chat_max_tokens(both, config) == 9


def test_the_error_body_is_openais():
    error = RequestError(404, "model 'x' is not served here", "not_found_error", "model")
    assert error.body() == {
        "error": {"message": "model 'x' is not served here", "type": "not_found_error", "param": "model", "code": 404}
    }
    assert RequestError(413, "too big").body()["error"] == {
        "message": "too big",
        "type": "invalid_request_error",
        "param": None,
        "code": 413,
    }


COMPLETION = Reply("completion", "cmpl-1", 1700000000, "student")
CHAT = Reply("chat", "chatcmpl-1", 1700000000, "student")


def test_a_completion_body_with_two_choices_and_usage():
    body = completion_body(COMPLETION, [Choice(" Paris.", "stop"), Choice(" B, C", "length")], 11, 6)
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "student",
        "choices": [
            {"index": 0, "text": " Paris.", "finish_reason": "stop", "logprobs": None},
            {"index": 1, "text": " B, C", "finish_reason": "length", "logprobs": None},
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17},
    }


def test_a_chat_completion_body():
    body = completion_body(CHAT, [Choice("Hello!", "stop")], 9, 3)
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "student",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }


def test_streamed_chunks_of_completions_and_chat():
    envelope = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "student"}
    assert chunk(COMPLETION, " Par") == {
        **envelope,
        "choices": [{"index": 0, "text": " Par", "finish_reason": None, "logprobs": None}],
    }
    assert chunk(COMPLETION, "", "length")["choices"] == [
        {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
    ]
    chat = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "student"}
    assert chunk(CHAT, None) == {
        **chat,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        ],
    }
    assert chunk(CHAT, "Hel")["choices"][0]["delta"] == {"content": "Hel"}
    assert chunk(CHAT, "", "stop")["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]
    line = event(chunk(CHAT, "Hel"))
    assert line.startswith("data: {") and line.endswith("}\n\n") and json.loads(line[6:]) == chunk(CHAT, "Hel")
    assert DONE == "data: [DONE]\n\n"


def test_a_new_reply_has_a_fresh_id_and_the_time():
    before = int(time.time())
    first, second = new_reply("chat", "student"), new_reply("chat", "student")
    assert first.id.startswith("chatcmpl-") and len(first.id) == len("chatcmpl-") + 32 and first.id != second.id
    assert before <= first.created <= int(time.time()) and first.model == "student"
    assert new_reply("completion", "m").id.startswith("cmpl-")


def test_models_body_lists_the_models_in_order():
    assert models_body(["student", "other"]) == {
        "object": "list",
        "data": [
            {"id": "student", "object": "model", "created": 0, "owned_by": "rebase"},
            {"id": "other", "object": "model", "created": 0, "owned_by": "rebase"},
        ],
    }


def test_finish_reasons():
    assert finish_reason(stopped=True, tokens=16, max_tokens=16) == "stop"  # a stop string on the last token
    assert finish_reason(stopped=False, tokens=3, max_tokens=16) == "stop"  # end of sequence
    assert finish_reason(stopped=False, tokens=16, max_tokens=16) == "length"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real fast tokenizer with one token per UTF-8 byte, so a character can arrive in halves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _released(tokenizer, text: str, stop: list[str]) -> tuple[list[str], tuple[str, bool]]:
    stream = TextStream(tokenizer, stop)
    return [stream.add(token) for token in tokenizer(text)["input_ids"]], stream.finish()


def test_text_is_released_as_it_comes_but_never_half_a_character(byte_tokenizer):
    pieces, rest = _released(byte_tokenizer, "café ok", [])
    assert pieces == ["c", "a", "f", "", "é", " ", "o", "k"]  # "é" is two bytes: nothing after the first
    assert rest == ("", False)


def test_text_that_could_become_a_stop_string_is_held_back(byte_tokenizer):
    pieces, rest = _released(byte_tokenizer, "Yes\n### next", ["\n###"])
    assert pieces[:7] == ["", "", "", "Y", "e", "s", ""] and "".join(pieces) == "Yes"
    assert rest == ("", True)  # the stop string and what follows never reach the client
    pieces, rest = _released(byte_tokenizer, "a##b", ["###"])
    assert pieces == ["", "", "a", "#"] and rest == ("#b", False)  # "##" was not a stop after all
    pieces, rest = _released(byte_tokenizer, "ab#", ["#"])
    assert pieces == ["a", "b", ""] and rest == ("", True)
