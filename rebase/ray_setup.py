"""Connecting to Ray: the cluster named by RAY_ADDRESS (as under `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os


def ensure_ray() -> None:
    """Start or join Ray once per process, quietly; safe to call from every stage."""
    import ray

    if ray.is_initialized():
        return
    # Ray's announced default: tasks that ask for no GPU keep the CUDA_VISIBLE_DEVICES they inherit.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls (without
        # it, a warning every few seconds for as long as the process lives); it listens on 127.0.0.1.
        include_dashboard=True,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Stages draw their own progress bars; Ray Data's (logged every few seconds off a terminal) would
    bury them, so they are off and Ray Data speaks only for warnings."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
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
