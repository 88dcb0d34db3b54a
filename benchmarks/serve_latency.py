"""A short request's latency beside long ones, and after clients that disconnected, on `rebase serve`.

    python benchmarks/serve_latency.py [--long-tokens 400] [--short-tokens 4]

The built-in student behind real Ray Serve on loopback (2 threads, batches of up to 8), over HTTP:
- beside: one long completion (`--long-tokens`, greedy, no stop) starts; 3 s later a short one
  (`--short-tokens`) is sent; the short one's latency, the long one's, and the short one alone first.
- after disconnects: three long non-streaming completions whose clients give up after 2 s; 1 s later
  a short one is sent: its latency (before the fix, the abandoned ones went on decoding in front of it).
Prints one JSON object. To measure the code before a change, run this file with `PYTHONPATH` pointing
at a checkout of that code (the deployment is imported from whatever `rebase` is on the path).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time

import requests

import rebase
from rebase.config import ServeConfig
from rebase.ray_setup import ensure_ray
from rebase.serve import build_app

KEY = "bench-key"
PROMPT = "Once upon a time, in a land far away, there lived"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> tuple[float, int | None]:
    started = time.monotonic()
    try:
        response = requests.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)
        tokens = response.json()["usage"]["completion_tokens"]
    except requests.exceptions.ReadTimeout:
        tokens = None
    return time.monotonic() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-tokens", type=int, default=400)
    parser.add_argument("--short-tokens", type=int, default=4)
    args = parser.parse_args()
    from ray import serve

    os.environ["REBASE_BENCH_KEY"] = KEY
    config = ServeConfig(
        model="builtin:gemma3-270m", name="student", api_key_env="REBASE_BENCH_KEY", port=free_port(), threads=2,
        max_batch_size=8, batch_wait_timeout_s=0.1, max_tokens_limit=max(args.long_tokens, 16),
    )  # fmt: skip
    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    serve.run(build_app(config), name="rebase", route_prefix="/")
    url = f"http://127.0.0.1:{config.port}/v1/completions"
    long_body = {"model": "student", "prompt": PROMPT, "max_tokens": args.long_tokens}
    short_body = {"model": "student", "prompt": "Yes or no?", "max_tokens": args.short_tokens}
    post(url, short_body, 120)  # warm-up
    alone, _ = post(url, short_body, 120)

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(long=post(url, long_body, 600)))
    thread.start()
    time.sleep(3)
    beside, _ = post(url, short_body, 600)
    thread.join()

    gone = [threading.Thread(target=post, args=(url, long_body, 2.0)) for _ in range(3)]
    for client in gone:
        client.start()
    for client in gone:
        client.join()
    time.sleep(1)
    after, _ = post(url, short_body, 600)
    handle = serve.get_deployment_handle("StudentServer", app_name="rebase")
    try:
        cancelled = handle.cancellations.remote().result()
    except Exception:  # code from before the change has no such method
        cancelled = None
    print(
        json.dumps(
            {
                "rebase": os.path.dirname(rebase.__file__),
                "short_alone_s": round(alone, 2),
                "long_s": round(result["long"][0], 2),
                "long_tokens": result["long"][1],
                "short_beside_long_s": round(beside, 2),
                "short_after_3_disconnects_s": round(after, 2),
                "cancelled_choices": cancelled,
            }
        ),
        flush=True,
    )
    serve.shutdown()


if __name__ == "__main__":
    main()
