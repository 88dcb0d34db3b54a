"""Connecting to Ray: the cluster named by RAY_ADDRESS (as under `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os

# Fault tolerance, chosen per kind of Ray work (README, "Fault tolerance", says the same for users).
# Actor pools (embedding, teacher, evaluation) keep Ray Data's defaults: a dead actor (lost node, OOM kill)
# restarts, on another node if need be, and its call is retried without limit; an actor that dies while
# starting (a model that cannot load) fails the stage at once (`DataContext.max_consecutive_actor_init_deaths`,
# default 0). Ray Data takes restart options only through the deprecated `ray_remote_args`. A retry cannot
# write twice: only the driver writes, once a whole block or call has come back.
# Retrieval's shard searchers hold an index shard in memory: a restart reloads it from disk, then the query
# is retried.
SEARCHER_RETRIES = {"max_restarts": 2, "max_task_retries": -1}
# Plain tasks (index shard builds write their file atomically, so a retry rewrites the same file).
TASK_RETRIES = 2


# Ray's switch between a Ray of one machine and one that other machines may join, read when Ray is imported.
# Off, a Ray started here takes the loopback address as its node address (Ray's default on macOS and Windows),
# and then every process of it listens on loopback only: GCS, raylet, object manager, workers (Serve's proxy,
# controller and replicas among them), dashboard, its agents and their Prometheus metrics.
ONE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ensure_ray() -> None:
    """Start or join Ray once per process, quietly; safe to call from every stage."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")  # set inside a Ray job; `auto` joins what `ray start` started here
    if not address:
        loopback_only()
    # Ray's announced default: tasks that ask for no GPU keep the CUDA_VISIBLE_DEVICES they inherit.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(
        # RAY_ADDRESS, else a Ray of our own: never a stale or token-protected `ray start` head that Ray would
        # otherwise pick up by itself. On a cluster, where it listens is the operator's choice (`ray start`).
        address=address or "local",
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls (without
        # it, a warning every few seconds for as long as the process lives); it listens on 127.0.0.1.
        include_dashboard=True,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    quiet_ray_data()


def loopback_only() -> None:
    """The Ray about to be started here listens on loopback only (`ONE_MACHINE`), unless the environment sets
    the switch itself. Ray reads it once, when it is imported, which is usually before this runs (a program
    that imports ray, then rebase), so Ray's reading is set too; every process it starts inherits the switch."""
    if os.environ.setdefault(ONE_MACHINE, "0") != "0":
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def quiet_ray_data() -> None:
    """Stages draw their own progress bars; Ray Data's (logged every few seconds off a terminal) would
    bury them, so they are off and Ray Data speaks only for warnings."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # A block that fails for a reason other than a lost process fails the stage: no row is dropped silently.
    context.max_errored_blocks = 0
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def actor_pool(concurrency: tuple[int, int]):
    """Ray Data's autoscaling actor pool of `concurrency` = (min, max) actors."""
    import ray.data

    low, high = concurrency
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def cluster_gpus() -> float:
    """GPUs the Ray cluster offers (0 on a laptop or a CPU-only cluster)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
