"""Progress bars that stay readable in logs: live on a terminal, a line every 10 s in a Ray job's log."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

from tqdm import tqdm


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr; redrawn at most every 10 s when stderr is not a terminal."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@contextmanager
def heartbeat(bar: tqdm, every: float | None = None):
    """Redraw `bar` every `every` seconds (default: its own interval) while the body runs, so work that
    reports in large steps (a teacher call of minutes) still shows it is alive and how long it has run."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every or bar.mininterval):
            bar.refresh()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
