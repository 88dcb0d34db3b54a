"""`rebase serve` with request batching vs the same deployment with `max_batch_size=1`, same run.

    python benchmarks/serve.py [--clients 16] [--requests 64] [--max-tokens 16] [--wait SECONDS] [--skip-float32]

Each configuration is deployed on real Ray Serve on a loopback port with the built-in model (one replica,
all cores), then `--clients` threads send `--requests` completions in total through the official OpenAI
SDK (greedy, `--max-tokens` new tokens, distinct prompts). Reports requests per second and p50/p99
latency of each, the batch sizes the deployment saw, and the throughput ratio (target at least 3x). Both
run at the default precision (`dtype: auto`, bfloat16 on a CPU with native bf16); the batched deployment
runs again at `dtype: float32` for the precision's speed-up.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from rebase.config import ServeConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(max_batch_size: int, args, dtype: str = "auto") -> dict:
    from openai import OpenAI
    from ray import serve

    from rebase.ray_setup import ensure_ray
    from rebase.serve import build_app

    config = ServeConfig(
        model="builtin:gemma3-270m",
        name="student",
        port=free_port(),
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=args.wait,
        dtype=dtype,
    )
    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    serve.run(build_app(config), name="rebase", route_prefix="/")
    client = OpenAI(base_url=f"http://127.0.0.1:{config.port}/v1", api_key="none", max_retries=0, timeout=600)
    client.completions.create(model="student", prompt="Warm up.", max_tokens=2)
    handle = serve.get_deployment_handle("StudentServer", app_name="rebase")
    seen = len(handle.batches.remote().result())

    def one(n: int) -> float:
        began = time.monotonic()
        reply = client.completions.create(
            model="student", prompt=f"Request {n}: the weather today is", max_tokens=args.max_tokens
        )
        assert reply.choices[0].text is not None
        return time.monotonic() - began

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        latencies = sorted(pool.map(one, range(args.requests)))
    wall = time.monotonic() - started
    sizes = handle.batches.remote().result()[seen:]
    serve.shutdown()
    return {
        "max_batch_size": max_batch_size,
        "dtype": dtype,
        "requests": args.requests,
        "seconds": round(wall, 2),
        "requests_per_second": round(args.requests / wall, 3),
        "p50_seconds": round(statistics.median(latencies), 3),
        "p99_seconds": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "batches": len(sizes),
        "mean_batch": round(sum(sizes) / len(sizes), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--wait", type=float, default=ServeConfig.model_fields["batch_wait_timeout_s"].default)
    parser.add_argument("--skip-float32", action="store_true", help="no batched run at dtype float32")
    args = parser.parse_args()
    unbatched = measure(1, args)
    print("max_batch_size=1", unbatched, flush=True)
    batched = measure(args.clients, args)
    print(f"max_batch_size={args.clients}", batched, flush=True)
    ratio = round(batched["requests_per_second"] / unbatched["requests_per_second"], 2)
    report = {"unbatched": unbatched, "batched": batched, "ratio": ratio}
    if not args.skip_float32:
        report["batched_float32"] = measure(args.clients, args, "float32")
        print(f"max_batch_size={args.clients}, float32", report["batched_float32"], flush=True)
        report["ratio_auto_vs_float32"] = round(
            batched["requests_per_second"] / report["batched_float32"]["requests_per_second"], 2
        )
    print(json.dumps(report, indent=2))
    print(f"batching vs max_batch_size=1: {ratio}x requests/s (target at least 3x)")
    if not args.skip_float32:
        print(f"batched, dtype auto vs float32: {report['ratio_auto_vs_float32']}x requests/s")


if __name__ == "__main__":
    main()
