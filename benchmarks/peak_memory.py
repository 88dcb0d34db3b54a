"""Peak memory of a benchmark step: the summed RSS of this process and all its descendants
(Ray's GCS, raylet and workers included), sampled in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time

import psutil


class PeakMemory:
    """`with PeakMemory() as memory: ...` then `memory.peak` in bytes."""

    def __init__(self, interval: float = 0.1):
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
