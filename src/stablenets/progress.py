"""The time part of a long job's progress lines: ``elapsed 40 s, ETA 200 s`` after ``done`` of
``total`` units, the ETA at the rate so far. Only the standard library is used, so every layer
may import this module."""

from __future__ import annotations

__all__ = ["timing"]


def timing(done: int, total: int, elapsed: float, upper: bool = False) -> str:
    """``elapsed 40 s, ETA 200 s``: ``elapsed / done * (total - done)`` seconds left; ``upper``
    says ``ETA at most`` (iterations that stop early once they converge)."""
    eta = elapsed / done * (total - done)
    return f"elapsed {elapsed:.0f} s, ETA {'at most ' if upper else ''}{eta:.0f} s"
