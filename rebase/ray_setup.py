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
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def cluster_gpus() -> float:
    """GPUs the Ray cluster offers (0 on a laptop or a CPU-only cluster)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
