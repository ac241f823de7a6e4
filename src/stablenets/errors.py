"""The first line of an error's message, for the one-line reports every layer gives (a
checkpoint that does not load, a CUDA graph capture that fails), and whether a failed read of
a saved file was the machine's or the file's. Only the standard library is used, so every layer
may import this module."""

from __future__ import annotations

import errno

__all__ = ["InvariantError", "first_line", "is_transient_read_error", "raise_if_transient"]


class InvariantError(RuntimeError):
    """A property the method guarantees failed on a run's numbers (certified <= empirical <=
    clean at some radius, a certificate an attack broke, PnP steps that grew): the job stops with
    one line naming it, its outputs unwritten."""


def first_line(err: BaseException) -> str:
    """The first non-blank line of ``str(err)``, or the error's type name when it says nothing."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_transient_read_error(err: BaseException) -> bool:
    """Whether ``err``, raised by ``torch.load``, is the machine's failure rather than the
    file's: an ``OSError`` (EIO or ESTALE of a network file system, EACCES, ENOMEM), a
    ``MemoryError``, or torch's CPU allocator running out. The file may then be intact, so a
    rerun must read it again rather than start afresh and overwrite it. Not ``EINVAL``: torch's
    zip reader raises it for a truncated or damaged archive (seeking past its end), as it
    raises ``RuntimeError``, ``pickle.UnpicklingError``, ``EOFError`` or ``UnicodeDecodeError``
    for others (measured with torch 2.x at every truncation of a checkpoint)."""
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, OSError):
        return err.errno != errno.EINVAL
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def raise_if_transient(err: BaseException, what: str) -> None:
    """Re-raise a read of ``what`` (``checkpoint <path>``) that failed on the machine's side
    (``is_transient_read_error``): an ``OSError`` as one line naming it, with its errno, and
    saying the file is kept; a memory error as it is. Return for a damaged or foreign file."""
    if not is_transient_read_error(err):
        return
    if not isinstance(err, OSError):
        raise err
    said = f"cannot read {what} now ({err.strerror or first_line(err)}); it is left as it is: rerun"
    raise (OSError(said) if err.errno is None else OSError(err.errno, said)) from err
