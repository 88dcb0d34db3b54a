"""Progress bars that stay readable in logs: live on a terminal, a line every 10 s in a Ray job's log."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr; redrawn at most every 10 s when stderr is not a terminal."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
