"""Interrupting a real `rebase` process the hard way, for the resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def kill_when(
    command: list[str], ready: Callable[[], bool], what: str, timeout: float = 300, env: dict[str, str] | None = None
) -> None:
    """Start `command` in its own process group and SIGKILL the whole group (Ray's workers included, or the
    driver alone where `env` joins it to the session's Ray, which then ends its workers) as soon as `ready()`
    is true; fails if the command ends before that."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the {what} finished before it could be interrupted"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def listening(pid: int) -> dict[str, str]:
    """Every address that a process or any of its descendants listens on (TCP) or is bound to (UDP), as
    `ss -ltnup` lists them, with the name of the process that holds it."""
    import psutil

    root, found = psutil.Process(pid), {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name = process.name()
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN or (connection.laddr and not connection.raddr):
                    found[f"{connection.laddr.ip}:{connection.laddr.port}"] = name
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that ended meanwhile
    return found


def is_loopback(address: str) -> bool:
    """Whether `ip:port` is on loopback (127.0.0.0/8, ::1, or 127.x as an IPv4-mapped IPv6 address)."""
    import ipaddress

    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)
