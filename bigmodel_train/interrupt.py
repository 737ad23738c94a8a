"""Graceful stops: SIGINT (Ctrl-C) and SIGTERM end a training run at the next step boundary.

Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens
to be, possibly inside an optimizer update, and SIGTERM kills the process outright; either way
a run with ``checkpoint_every=0`` loses everything. ``StopSignals`` replaces both handlers for
the life of a ``with`` block: the first signal only records itself (``stop.signum``), the loop
finishes the update it is in, writes a checkpoint atomically and raises :class:`Interrupted`;
a *second* signal raises ``KeyboardInterrupt`` at once for a user who really wants out (an
atomic save in progress then leaves the previous checkpoints untouched).

Handlers can only be installed from the main thread; elsewhere (a trainer run from a worker
thread) ``StopSignals`` is inert and the host program's own handling applies.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Interrupted", "StopSignals", "exit_code"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + N (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class Interrupted(Exception):
    """A run stopped by a signal after checkpointing; ``exit_code`` is 130 / 143."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = exit_code(signum)
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}; continue with --resume" if checkpoint else "no checkpoint written"
        super().__init__(f"{name}: stopped after step {step} ({where})")


class StopSignals:
    """Record SIGINT / SIGTERM instead of dying, inside a ``with`` block (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A stop signal has arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
