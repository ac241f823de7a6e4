"""The first line of an error's message, for the one-line reports every layer gives (a
checkpoint that does not load, a CUDA graph capture that fails). Only the standard library is
used, so every layer may import this module."""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(err: BaseException) -> str:
    """The first non-blank line of ``str(err)``, or the error's type name when it says nothing."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
