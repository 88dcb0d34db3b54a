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
