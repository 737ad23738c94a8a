"""One writer per run directory: an OS-level lock on ``RUN_DIR/.lock``.

Two trainers on one ``--run-dir`` would overwrite each other's checkpoints, metrics and data
cache while both report success. ``RunLock`` takes an exclusive ``flock`` on ``RUN_DIR/.lock``
(``msvcrt.locking`` on Windows) and writes the holder's pid into it. The kernel drops the lock
when the file descriptor closes, so it is released on *any* exit — a normal return, an
exception, SIGKILL or a crash — and a stale ``.lock`` file left behind never blocks a later run
(only a live lock does; the pid in the file is informational).

    with RunLock(run_dir):        # RunLockedError naming the holder's pid if another process has it
        ... write the run ...

The lock is per open file description, so a second ``RunLock`` on the same directory inside the
same process is refused too (tune's trials each lock their own trial directory).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".lock"

if os.name == "nt":  # pragma: no cover - the project's machines are POSIX
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


class RunLockedError(RuntimeError):
    """Another process (or another ``RunLock`` in this one) is writing the run directory."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        self.run_dir, self.holder = run_dir, holder
        super().__init__(f"run directory {run_dir} is in use by {holder} (lock {run_dir / LOCK_NAME}); "
                         "wait for it to finish, or use another --run-dir")


class RunLock:
    """Exclusive lock of a run directory for the life of a ``with`` block (created if missing)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``RunLockedError`` at once (never waits)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            try:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            raise RunLockedError(self.run_dir, f"process {text}" if text.isdigit() else "another process")
        # The pid is for the message a second process prints; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it); the file stays, harmlessly."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
