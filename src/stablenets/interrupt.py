"""Stopping a long job cleanly: SIGUSR1/SIGTERM (what SLURM sends before a time limit) set a
flag that the job polls between units of work; it then saves its progress and raises
``Interrupted``, which the command line turns into exit code 75 (temporary failure), so that a
rerun resumes. Only the standard library is used, so every layer may import this module.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["Interrupted", "StopFlag", "stop_asked"]


class Interrupted(RuntimeError):
    """A signal asked the run to stop; its progress was saved first."""


class StopFlag:
    """Within ``with StopFlag() as stop``, SIGUSR1/SIGTERM set ``stop.signum`` instead of killing
    the process; the previous handlers come back on exit."""

    _active: list[StopFlag] = []  # noqa: RUF012 (the flags entered and not left, innermost last)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        StopFlag._active.append(self)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        StopFlag._active.remove(self)

    @property
    def raised(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None


def stop_asked() -> int | None:
    """The signal that asked a running ``StopFlag`` block to stop, or ``None``: for a line that
    acknowledges it while a long unit of work runs on (an attack call of minutes), read from any
    thread without touching the job's own polling."""
    return next((flag.signum for flag in StopFlag._active if flag.signum is not None), None)
