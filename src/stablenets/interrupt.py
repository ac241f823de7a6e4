"""Stopping a long job cleanly: SIGUSR1/SIGTERM (what SLURM sends before a time limit) set a
flag that the job polls between units of work; it then saves its progress and raises
``Interrupted``, which the command line turns into exit code 75 (temporary failure), so that a
rerun resumes. Only the standard library is used, so every layer may import this module.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["Interrupted", "StopFlag"]


class Interrupted(RuntimeError):
    """A signal asked the run to stop; its progress was saved first."""


class StopFlag:
    """Within ``with StopFlag() as stop``, SIGUSR1/SIGTERM set ``stop.signum`` instead of killing
    the process; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def raised(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None
