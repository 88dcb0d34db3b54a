"""Progress bars that stay readable in logs: live on a terminal, a line every 10 s in a Ray job's log."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

from tqdm import tqdm


def duration(seconds: float) -> str:
    """A duration as people read it: 12.3s, 4m 05s, 2h 03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr; redrawn at most every 10 s when stderr is not a terminal."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@contextmanager
def heartbeat(bar: tqdm, every: float | None = None, position: Callable[[], int] | None = None):
    """Redraw `bar` every `every` seconds (default: its own interval, at least 1 s) while the body runs, so
    work that reports in large steps still shows it is alive and how long it has run. With `position` (how
    much is done, asked each time: e.g. prompts that actors have finished), the bar also moves to it, so its
    rate and time left follow the work. Yields `sync()`, which moves the bar to `position` at once."""
    stop = threading.Event()
    lock = threading.Lock()

    def sync() -> None:
        with lock:
            if position is not None:
                done = min(position(), bar.total if bar.total is not None else float("inf"))
                if done > bar.n:
                    bar.update(done - bar.n)
                    return
            bar.refresh()

    def beat() -> None:
        while not stop.wait(every or max(bar.mininterval, 1.0)):
            sync()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield sync
    finally:
        stop.set()
        thread.join()
