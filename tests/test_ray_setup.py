"""Where the Ray that rebase starts on one machine listens: loopback only (rebase/ray_setup.py). The session's
Ray is started by `ensure_ray` after Ray was imported, the harder case; `rebase serve` with a Ray of its own,
Serve included, is checked in tests/test_serve.py."""

from __future__ import annotations

import os

from processes import is_loopback, listening


def test_the_session_ray_listens_on_loopback_only(ray_address):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray_address.startswith("127.0.0.1:")
    sockets = listening(os.getpid())  # the driver and everything it started: GCS, raylet, workers, agents
    held_by = set(sockets.values())
    assert {"gcs_server", "raylet"} <= held_by, sockets
    assert any(name.startswith("ray::DashboardA") for name in held_by), sockets  # the agent and its metrics
    beyond = {address: name for address, name in sockets.items() if not is_loopback(address)}
    # Serve replicas of other tests of the session may be running: their gRPC server is Ray's one exception
    assert all(name.startswith("ray::ServeReplica:") for name in beyond.values()), beyond


def test_loopback_helpers_tell_addresses_apart():
    assert is_loopback("127.0.0.1:80") and is_loopback("[::1]:80") and is_loopback("::ffff:127.0.0.1:80")
    assert not is_loopback("0.0.0.0:80") and not is_loopback(":::80") and not is_loopback("192.0.2.2:80")
