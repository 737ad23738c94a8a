"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every file the porting layer writes goes through here. The bytes go to a temporary file in the
*same directory* (``os.replace`` is only atomic within one file system), which is flushed and
``fsync``-ed before it is renamed over the target, and the directory is ``fsync``-ed after the
rename so the new name itself survives a power cut. If the writer raises (or the process is
interrupted with ``KeyboardInterrupt``) the temporary file is deleted and the old file, if any,
is left byte-for-byte as it was.

If ``path`` is a symbolic link the link itself is replaced by a regular file; the file it
pointed to is not modified (which is what we want in a HuggingFace cache, where snapshot
entries link to shared blobs).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write", "atomic_write_bytes", "atomic_write_text"]

# Temporary files are hidden and carry this suffix, so a crash's leftovers are recognisable.
_TMP_SUFFIX = ".tmp"


def _create_temp(target: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file next to ``target``; return its fd and path.

    ``os.open(..., 0o666)`` rather than ``tempfile.mkstemp`` because mkstemp creates the file
    with mode 0600, which would leave every checkpoint we write unreadable to other users; here
    the process umask applies, exactly as for a plain ``open(path, "wb")``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # astronomically unlikely name clash: draw another name
            continue
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _fsync_dir(directory: Path) -> None:
    """Persist a rename by fsync-ing its directory (POSIX). Platforms that cannot open a
    directory (Windows) raise OSError here; the rename is still atomic there, so ignore it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *,
                encoding: str | None = None) -> Iterator[IO[Any]]:
    """Context manager yielding a file object whose contents replace ``path`` atomically when
    the ``with`` block ends without an exception.

    ``mode`` is ``"wb"`` (default) or ``"w"`` (text; ``encoding`` defaults to UTF-8). On an
    exception inside the block the temporary file is removed, ``path`` is untouched, and the
    exception propagates. An existing target's permission bits are kept.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', not {mode!r}")
    target = Path(path)
    fd, tmp = _create_temp(target)
    try:
        if mode == "w":
            f: IO[Any] = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        try:  # keep the replaced file's permissions (e.g. a read-only-for-others checkpoint)
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        except FileNotFoundError:
            pass
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temporary file behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], object]) -> Path:
    """Call ``writer(f)`` with a binary file object and atomically make its output ``path``.

    For writers that stream (``np.savez(f, ...)``, ``json.dump``...). Returns ``path`` as a
    ``Path``. If ``writer`` raises, ``path`` keeps its old contents and no temporary remains.
    """
    with atomic_open(path, "wb") as f:
        writer(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """Atomically replace ``path`` with ``data``; returns ``path`` as a ``Path``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``. Newlines are written
    as given (no platform translation), so the file's bytes do not depend on the OS."""
    return atomic_write_bytes(path, text.encode(encoding))
