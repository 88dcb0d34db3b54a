"""Several LoRA students in one `rebase serve` deployment (one base in memory, an adapter per student) vs one
deployment per student (each its merged model), same run.

    python benchmarks/students.py [--students 2] [--requests 64] [--clients 16] [--max-tokens 32]

Trains `--students` LoRA students of the built-in model with `rebase train` (a few steps each on navigate
examples made by a program; kept in ~/.cache/rebase/bench-students and reused), then deploys them on real
Ray Serve on a loopback port, first all in one deployment (one replica, all cores), then one deployment each
(one replica each, the cores split between them). Each time `--clients` threads send `--requests`
completions in all, spread evenly over the students, through the official OpenAI SDK (greedy, distinct
prompts, `--max-tokens` new tokens). Reports the replicas' resident memory (before and after the load), the
parameters they hold, requests and generated tokens per second, and the ratios of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ceiling import training_set
from serve import free_port

from rebase.config import ServeConfig
from rebase.io import cache_dir

TASK = Path(__file__).resolve().parent.parent / "jobs" / "tasks" / "navigate.yaml"


def students(count: int) -> list[Path]:
    """`count` LoRA students of the built-in model, trained on different examples (resumed when done)."""
    import rebase

    root = cache_dir() / "bench-students"
    examples = training_set(16 * count, set())
    made = []
    for number in range(count):
        data = root / f"student-{number}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(e) + "\n" for e in examples[16 * number : 16 * (number + 1)]))
        out = root / f"student-{number}"
        rebase.train(data, TASK, out, epochs=1, batch_size=4, max_steps=4, max_length=256)
        made.append(out)
    return made


def replica_memory() -> dict[str, float]:
    """Resident memory (GB) of each Serve replica process of StudentServer, by process title."""
    import psutil

    found = {}
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(process.info["cmdline"] or [])
        if "ServeReplica:" in title and "StudentServer" in title:
            found[title.split()[0]] = round(process.info["memory_info"].rss / 1e9, 3)
    return found


def load(routes: list[tuple[str, str]], args) -> dict:
    """`args.requests` completions over (base URL, model name) routes in turn, `args.clients` at once."""
    from openai import OpenAI

    clients = {url: OpenAI(base_url=url, api_key="none", max_retries=0, timeout=900) for url, _ in routes}
    for url, name in routes:  # warm each student up
        clients[url].completions.create(model=name, prompt="Warm up.", max_tokens=2)

    def one(n: int) -> int:
        url, name = routes[n % len(routes)]
        reply = clients[url].completions.create(
            model=name, prompt=f"Request {n}: Take {n % 7 + 1} steps. Turn left.", max_tokens=args.max_tokens
        )
        return reply.usage.completion_tokens

    began = time.monotonic()
    with ThreadPoolExecutor(args.clients) as pool:
        tokens = sum(pool.map(one, range(args.requests)))
    seconds = time.monotonic() - began
    return {
        "seconds": round(seconds, 1),
        "requests_per_second": round(args.requests / seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
    }


def measure(shared: bool, made: list[Path], args) -> dict:
    from ray import serve

    from rebase.ray_setup import ensure_ray
    from rebase.serve import build_app

    ensure_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cores = os.cpu_count() or 1
    if shared:
        config = ServeConfig(model=[str(m) for m in made], port=port, threads=cores)
        serve.run(build_app(config), name="students", route_prefix="/")
        routes = [(f"http://127.0.0.1:{port}/v1", m.name) for m in made]
        apps = ["students"]
    else:
        routes, apps = [], []
        for student in made:
            config = ServeConfig(model=str(student), port=port, threads=max(1, cores // len(made)))
            serve.run(build_app(config), name=student.name, route_prefix=f"/{student.name}")
            routes.append((f"http://127.0.0.1:{port}/{student.name}/v1", student.name))
            apps.append(student.name)
    try:
        loaded = [serve.get_deployment_handle("StudentServer", app_name=app).loaded.remote().result() for app in apps]
        before = replica_memory()
        speed = load(routes, args)
        after = replica_memory()
    finally:
        serve.shutdown()
    return {
        "setup": "one deployment, shared base" if shared else "one deployment per student",
        "replicas": len(before),
        "parameters": sum(m["parameters"] for models in loaded for m in models),
        "models_in_memory": sum(len(models) for models in loaded),
        "rss_gb_before": round(sum(before.values()), 2),
        "rss_gb_after": round(sum(after.values()), 2),
        **speed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.students < 2 or args.students > (os.cpu_count() or 1):
        parser.error(f"--students: 2 to {os.cpu_count()} (one deployment each needs a CPU)")
    made = students(args.students)
    results = [measure(True, made, args), measure(False, made, args)]
    for result in results:
        print(json.dumps(result), flush=True)
    shared, separate = results
    print(
        "memory (replicas' RSS after load): separate / shared = "
        f"{separate['rss_gb_after'] / shared['rss_gb_after']:.2f}x; "
        f"parameters held: {separate['parameters'] / shared['parameters']:.2f}x; "
        f"requests/s: shared / separate = {shared['requests_per_second'] / separate['requests_per_second']:.2f}x"
    )


if __name__ == "__main__":
    main()
