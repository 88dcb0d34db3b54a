"""The stage-directory protocol every stage follows: refuse a directory holding someone else's files,
refuse one made from other inputs (a fingerprint), lock it while writing, resume an unfinished one, and
mark a finished one with `stats.json` and `_SUCCESS` (written last, so a killed stage is never taken as
done).

The lock is an advisory `flock` on `.rebase.lock` in the directory, which names its holder (process and
host): a second writer is refused with that name, and a lock whose process died is free again, since
the kernel drops a dead process's locks. It holds between processes of one machine and on file systems
that support `flock` (local disks; NFS only where the server does)."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from rebase.errors import RebaseError
from rebase.io import read_json_object, write_json_atomic

SUCCESS = "_SUCCESS"
STATS = "stats.json"
LOCK = ".rebase.lock"
_HELD: dict[str, IO[str]] = {}  # directories this process holds the lock of


@dataclass(frozen=True)
class StageDir:
    """One stage's output directory.

    `own` names the files and folders the stage writes; anything else there is refused. A stage whose
    directory holds files it cannot list in advance (a student: weights, tokenizer, checkpoints) passes
    `own=None` and keeps its fingerprint in `fingerprint_file`, written first by `begin`: a non-empty
    directory without that file is then refused."""

    path: Path
    what: str
    own: frozenset[str] | None
    flag: str = "--out"
    fingerprint_file: str = STATS

    def refuse_foreign(self) -> None:
        """Refuse a path that is a file or a directory holding what the stage does not write, so nobody's
        data is overwritten; temp files left by a killed atomic write do not count."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RebaseError(f"{self.flag} {path} is a file; choose a directory")
        names = {p.name for p in path.iterdir() if not _is_temp(p.name)} if path.exists() else set()
        if self.own is not None and names - self.own:
            raise RebaseError(f"{self.flag} {path} holds files that are not {self.what}; choose another")
        if self.own is None and names and not (path / self.fingerprint_file).is_file():
            raise RebaseError(f"{self.flag} {path} is not empty and is not {self.what}; choose another")
        check_writable(path, self.flag)

    def check(self, fingerprint: str) -> dict | None:
        """Refuse foreign files and other inputs; the stats of a finished run with these inputs, else None."""
        self.refuse_foreign()
        path = self.path
        marker = path / self.fingerprint_file
        if marker.is_file() and read_json_object(marker).get("fingerprint") != fingerprint:
            raise RebaseError(
                f"{path} holds {self.what} made from other inputs or settings; choose another {self.flag}"
            )
        return self.finished_stats()

    def finished_stats(self) -> dict | None:
        """The stats of a finished run in this directory, or None while it is unfinished."""
        stats = self.path / STATS
        if not (self.path / SUCCESS).exists() or not stats.is_file():
            return None
        return read_json_object(stats)

    def begin(self, fingerprint: str, **record) -> None:
        """Open the directory for (re)writing: it is no longer finished until `finish`; a separate
        fingerprint file is written now, so a re-run with other inputs is refused even mid-way."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / SUCCESS).unlink(missing_ok=True)
        if self.fingerprint_file != STATS:
            write_json_atomic(self.path / self.fingerprint_file, {"fingerprint": fingerprint, **record})

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the directory's lock while the block writes it (see the module docstring). A directory
        this made and the block left empty (refused early) is removed again."""
        created = not self.path.exists()
        hold_lock(self.path, self.flag)
        try:
            yield
        finally:
            release_lock(self.path)
            if created and [p.name for p in self.path.iterdir()] == [LOCK]:
                (self.path / LOCK).unlink()
                self.path.rmdir()

    def finish(self, stats: dict) -> None:
        """Write stats.json, then `_SUCCESS`: the stage is done."""
        write_json_atomic(self.path / STATS, stats)
        (self.path / SUCCESS).write_text("")


def hold_lock(path: Path, flag: str = "--out") -> None:
    """Take the lock of directory `path` (made if need be) for this process, or refuse in one line naming
    the process that holds it. Taking it again in the same process is a no-op."""
    key = str(Path(path).absolute())
    if key in _HELD:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    handle = open(Path(path) / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - open as long as the lock is held
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RebaseError(f"{flag} {path} is being written by {holder}; wait for it to end, or stop it") from None
    handle.seek(0)
    handle.truncate()
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    handle.write(f"process {os.getpid()} on {socket.gethostname()} (since {since})")
    handle.flush()
    _HELD[key] = handle


def release_lock(path: Path) -> None:
    """Let go of the lock of `path` if this process holds it."""
    handle = _HELD.pop(str(Path(path).absolute()), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _is_temp(name: str) -> bool:
    """A temp file left by a killed atomic write (rebase.io), or the lock file: not a foreign file."""
    return name == LOCK or (name.startswith(".") and name.endswith(".tmp"))


def is_finished(directory: Path) -> bool:
    """Whether a stage directory is marked done."""
    return (Path(directory) / SUCCESS).exists()


def check_writable(path: Path, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written (`/proc/x`, a read-only mount) before any work: a real
    probe, a directory made and removed at once in the path or its nearest existing parent."""
    target = Path(path).expanduser().absolute()
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing == target and not target.is_dir():
        raise RebaseError(f"{flag} {path} is a file; choose a directory")
    if existing is None or not existing.is_dir():
        raise RebaseError(f"{flag} {path} cannot be made: {existing} is not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".rebase-probe-", dir=existing)).rmdir()
    except OSError as error:
        raise RebaseError(f"{flag} {path} cannot be written ({error.strerror}); choose another") from None


def read_stats(directory: Path) -> dict:
    """A stage directory's stats.json, {} when there is none."""
    path = Path(directory).expanduser() / STATS
    return read_json_object(path) if path.is_file() else {}
