"""`rebase serve`: students as one OpenAI-compatible endpoint on Ray Serve.

One deployment, `StudentServer` (`rebase/serve/app.py`): a FastAPI ingress and the models in each replica,
replicas autoscaled by Ray Serve. Several students share it, each under its own name (the request's
`model`); LoRA students of one base share one copy of it, each request decoded with its student's adapter
(`rebase/serve/students.py` decides who shares what). Concurrent requests are decoded together:
`@serve.batch` collects them and the engine's stepwise decode loop advances every request of the batch in one
forward pass per token (one per model in memory), streaming each request's tokens back as they come
(server-sent events with `stream: true`). The protocol
itself (request models, limits, response bodies) is `rebase/serve/openai.py`, plain functions.

Routes (every one but `/healthz` needs `Authorization: Bearer KEY` when $REBASE_API_KEY is set):
    GET  /healthz                                        liveness, no key needed
    GET  /v1/models                                      the models served
    POST /v1/completions, /v1/chat/completions           the prompt as sent (chat: the model's chat
                                                         template, or the messages' text joined)
    GET  /tasks/TASK/v1/models                           the models served for TASK
    POST /tasks/TASK/v1/completions, .../chat/completions  raw inputs put in the task's prompt format
Requests are validated strictly (unknown fields, wrong types, out-of-range values: 400 with an OpenAI-style
error body; bodies over the limit: 413); the model a request names is only matched against the served
names (another is a 404), never loaded, so no request can make the server open a path or run code.

With `engine: vllm` the application is Ray Serve LLM's OpenAI app over vLLM instead (one model, one GPU per
replica, its own routes and request limits, no task routes); `vllm_llm_config` is the config it is built from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rebase import precision
from rebase.config import ServeConfig, build_config
from rebase.errors import RebaseError
from rebase.models import BUILTINS, canonical_model_name, resolve_model
from rebase.serve.students import Group, Student, groups, served_name, students

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.llm import LLMConfig

__all__ = ["build_app", "served_name", "serve_student", "vllm_llm_config"]


def build_app(args: dict | ServeConfig) -> Application:
    """The Serve application for a ServeConfig or its fields (what `serve run jobs/serve.yaml` imports)."""
    config = args if isinstance(args, ServeConfig) else build_config(ServeConfig, args, "serve config")
    if config.engine == "vllm":
        try:
            from ray.serve.llm import build_openai_app
        except ImportError as error:
            raise _no_serve_llm(error) from None
        return build_openai_app({"llm_configs": [vllm_llm_config(config)]})
    served = students(config)
    return _student_app(config, served, groups(served, config.base))


def _student_app(config: ServeConfig, served: list[Student], grouped: list[Group]) -> Application:
    """The transformers deployment of students whose names, tasks (a bad file failed once, before), adapters
    and shared bases are settled; replicas get absolute paths: their working directory is not ours."""
    from rebase.serve.app import StudentServer

    return StudentServer.options(**_student_options(config)).bind(config, served, grouped)


def vllm_llm_config(config: ServeConfig) -> LLMConfig:
    """Ray Serve LLM's config for serving `config`'s model with vLLM: the same served name and the same
    replica counts and request concurrency as the transformers deployment."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError as error:
        raise _no_serve_llm(error) from None
    if len(config.model) > 1:
        raise RebaseError("engine vllm serves one model per endpoint here; serve several with engine transformers")
    model = config.model[0]
    # A built-in is converted once into the cache; an HF id is left for vLLM to fetch on its GPU node.
    source = str(resolve_model(model)) if model in BUILTINS else canonical_model_name(model)
    return LLMConfig(
        model_loading_config={"model_id": served_name(config), "model_source": source},
        deployment_config=_scaling(config),
        # our auto is vLLM's own (the checkpoint's precision, float16 for float32 checkpoints)
        engine_kwargs={"dtype": config.dtype} if config.dtype != "auto" else {},
    )


def _no_serve_llm(error: ImportError) -> RebaseError:
    return RebaseError(f"engine vllm needs Ray Serve LLM with vLLM on the GPU nodes ({error})")


def _scaling(config: ServeConfig) -> dict:
    """Replica count (fixed, or autoscaled between min and max) and requests per replica, as Serve options."""
    if config.min_replicas == config.max_replicas:
        replicas: dict = {"num_replicas": config.min_replicas}
    else:
        replicas = {
            "autoscaling_config": {
                "min_replicas": config.min_replicas,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            }
        }
    return {**replicas, "max_ongoing_requests": config.max_ongoing_requests}


def _student_options(config: ServeConfig) -> dict:
    """StudentServer's deployment options: scaling, one CPU per replica, a GPU if the cluster has one."""
    actor: dict = {"num_cpus": 1}
    key = os.environ.get(config.api_key_env)
    if key:  # replicas on other nodes do not see this shell's environment
        actor["runtime_env"] = {"env_vars": {config.api_key_env: key}}
    if _cluster_gpus() > 0:
        actor["num_gpus"] = 1
    return {**_scaling(config), "ray_actor_options": actor}


def _cluster_gpus() -> float:
    """The cluster's GPUs once Ray is up; none while an application is only being built."""
    import ray

    from rebase.ray_setup import cluster_gpus

    return cluster_gpus() if ray.is_initialized() else 0.0


def serve_student(config: ServeConfig, ready: Callable[[str], None] | None = None) -> None:
    """Deploy the student on the local (or RAY_ADDRESS) Ray and block until Ctrl-C; `ready(url)` is
    called once the endpoint answers."""
    from ray import serve

    from rebase.ray_setup import ensure_ray

    served = students(config)  # names, tasks, adapters: one line each if wrong, before Ray starts
    grouped = groups(served, config.base)
    for group in grouped:
        resolve_model(group.model)  # a model that cannot be found offline: one line, before Ray starts
    ensure_ray()
    if config.engine == "transformers":
        from rebase.ray_setup import cluster_gpus

        precision.check(config.dtype, bool(cluster_gpus()), "serve")
    application = build_app(config) if config.engine == "vllm" else _student_app(config, served, grouped)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application, name="rebase", route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}/v1"
    names = ", ".join(student.name for student in served)
    print(f"serving {names} at {url} (Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(url)
    try:
        while True:
            time.sleep(1)
    finally:
        serve.shutdown()
