"""Headless Chromium for tests: a page's DOM after its scripts ran, or a screenshot of it.

Where Chromium is missing, tests that need it skip with the reason, except under CI (the variable `CI`
set): `.ci/run` installs Chromium, so there a missing one fails the test loudly."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MISSING = "chromium not found: apt-get install chromium"


def chromium() -> str | None:
    """The chromium executable on PATH, or None."""
    return shutil.which("chromium")


# Marks a test that needs Chromium, so it skips before doing any work where Chromium is missing.
needs_chromium = pytest.mark.skipif(chromium() is None and not os.environ.get("CI"), reason=MISSING)


def _run(html_path: Path, tmp_dir: Path, *arguments: str, timeout: float = 60) -> str:
    """Run Chromium headless on a local file with a fresh profile, no network chatter; returns stdout."""
    executable = chromium()
    if executable is None:
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{MISSING} (CI installs it: see .ci/run)")
        pytest.skip(MISSING)
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_dir))
    command = [
        executable,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *arguments,
        Path(html_path).resolve().as_uri(),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def render(html_path: Path, tmp_dir: Path) -> str:
    """The page's DOM after load (and its scripts) ran, as serialised HTML."""
    return _run(html_path, tmp_dir, "--dump-dom")


def screenshot(html_path: Path, tmp_dir: Path, png_path: Path, size: str = "1200,3000") -> Path:
    """A PNG of the page at `size` (width,height in CSS pixels)."""
    _run(html_path, tmp_dir, f"--screenshot={Path(png_path).resolve()}", f"--window-size={size}")
    return Path(png_path)
