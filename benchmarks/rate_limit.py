"""The hosted teacher's rate limiter: requests per minute measured at the endpoint against the setting.

    python benchmarks/rate_limit.py [--rpm 120,600] [--tpm 30000] [--seconds 30]

A loopback OpenAI-compatible endpoint (FastAPI under uvicorn; it answers every chat completion at once
with a fixed reply and its usage, so only the client side is measured) notes when each request arrives.
For each setting, prompts go through rebase's generation pool (`engine openai`, two actors with eight
requests in flight each, so unlimited they would far outrun the limit) for about `--seconds`; printed:
the requests and tokens per minute the endpoint saw over the run and in its busiest 10-second window,
each against the setting (the ratio must stay at or under 1), and the unlimited rate measured first in
the same run as the baseline.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request

from rebase.config import GenerationConfig
from rebase.generate.engines import GenerationParams
from rebase.generate.pool import GenerationPool

PROMPT_TOKENS, COMPLETION_TOKENS = 200, 20


class Endpoint:
    def __init__(self):
        self.times: list[float] = []
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        app = FastAPI()
        app.post("/v1/chat/completions")(self.chat)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)

    async def chat(self, request: Request):
        body = await request.json()
        if (body.get("max_tokens") or 0) > 1:  # not the client's one-token start-up check
            self.times.append(time.monotonic())
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
        return {
            "id": "x",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {**usage, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS},
        }


def measure(endpoint: Endpoint, prompts: int, rpm: int | None, tpm: int | None) -> dict:
    endpoint.times.clear()
    config = GenerationConfig(
        engine="openai",
        base_url=f"http://127.0.0.1:{endpoint.port}/v1",
        concurrency=(2, 2),
        request_concurrency=8,
        prompts_per_call=max(1, prompts // 8),
        rpm=rpm,
        tpm=tpm,
    )
    pool = GenerationPool(config, "teacher")
    texts = {f"h{n}": f"prompt {n} " + "word " * 150 for n in range(prompts)}
    with tempfile.TemporaryDirectory() as cache:
        pool.answer(texts, Path(cache), GenerationParams(max_new_tokens=COMPLETION_TOKENS), "rate limit")
    times = sorted(endpoint.times)
    span = times[-1] - times[0]
    busiest = max(sum(1 for t in times if start <= t < start + 10) for start in times)
    per_request = PROMPT_TOKENS + COMPLETION_TOKENS
    return {
        "rpm": rpm,
        "tpm": tpm,
        "requests": len(times),
        "seconds": round(span, 1),
        "requests_per_minute": round((len(times) - 1) / span * 60, 1),
        "busiest_10s_per_minute": busiest * 6,
        "tokens_per_minute": round((len(times) - 1) / span * 60 * per_request),
        "limiter": pool.limits(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", default="120,600")
    parser.add_argument("--tpm", type=int, default=30000, help="also a run limited by tokens only")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    endpoint = Endpoint()
    baseline = measure(endpoint, 400, None, None)
    print(json.dumps({"baseline": baseline}), flush=True)
    for rpm in [int(value) for value in args.rpm.split(",") if value]:
        found = measure(endpoint, max(4, int(rpm * args.seconds / 60)), rpm, None)
        found["ratio"] = round(found["requests_per_minute"] / rpm, 3)
        found["busiest_ratio"] = round(found["busiest_10s_per_minute"] / rpm, 3)
        print(json.dumps(found), flush=True)
    if args.tpm:
        # the limiter counts the prompt estimated (its characters / 4) plus max_new_tokens before sending,
        # then settles with the usage reported; the endpoint reports PROMPT_TOKENS + COMPLETION_TOKENS
        per_request = PROMPT_TOKENS + COMPLETION_TOKENS
        found = measure(endpoint, max(4, int(args.tpm / per_request * args.seconds / 60)), None, args.tpm)
        found["ratio"] = round(found["tokens_per_minute"] / args.tpm, 3)
        print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
