"""Pickles as Python 2's ``cPickle.dump(obj, f, protocol=2)`` wrote the official CIFAR-10
batches, for tests: Python 3 cannot write them (its ``bytes`` pickle as ``_codecs.encode`` or
``SHORT_BINBYTES``, a Python 2 ``str`` as ``SHORT_BINSTRING``/``BINSTRING``, and numpy now names
itself ``numpy._core``). Only what the batches hold: dicts, ``bytes`` (Python 2 ``str``), small
ints, lists and 2-D uint8 arrays.
"""

from __future__ import annotations

import struct

import numpy as np


class _Writer:
    """Protocol 2 opcodes, memoised as cPickle did (ids from 1, for containers, the globals,
    reduced objects and dict keys)."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo = 0

    def put(self) -> None:
        self.memo += 1
        self.out += (
            b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)
        )

    def string(self, value: bytes, memo: bool = False) -> None:
        short = len(value) < 256
        self.out += (b"U" + bytes([len(value)])) if short else b"T" + struct.pack("<i", len(value))
        self.out += value
        if memo:
            self.put()

    def global_(self, module: str, name: str) -> None:
        self.out += f"c{module}\n{name}\n".encode()
        self.put()

    def int_(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        else:
            self.out += b"J" + struct.pack("<i", value)

    def array(self, value: np.ndarray) -> None:
        """``numpy.core.multiarray._reconstruct(ndarray, (0,), 'b')`` then its state: version
        1, the shape, ``dtype('u1', 0, 1)`` with its own state, C order and the bytes."""
        assert value.dtype == np.uint8 and value.ndim == 2, value.dtype
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self.out += b"K\x00\x85"  # (0,)
        self.string(b"b")
        self.out += b"\x87R"  # TUPLE3, REDUCE
        self.put()
        self.out += b"(K\x01"  # MARK, version 1
        self.int_(value.shape[0])
        self.int_(value.shape[1])
        self.out += b"\x86"  # TUPLE2: the shape
        self.global_("numpy", "dtype")
        self.string(b"u1")
        self.out += b"K\x00K\x01\x87R"  # ('u1', 0, 1), REDUCE
        self.put()
        self.out += b"(K\x03"  # the dtype's state: version 3, byte order '|', no fields
        self.string(b"|")
        self.out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # ..., TUPLE, BUILD
        self.out += b"\x89"  # NEWFALSE: not Fortran order
        self.string(value.tobytes())
        self.out += b"tb"  # TUPLE, BUILD

    def value(self, value: object) -> None:
        if isinstance(value, dict):
            self.out += b"}"
            self.put()
            self.out += b"("
            for key, item in value.items():
                self.string(key, memo=True)
                self.value(item)
            self.out += b"u"  # SETITEMS
        elif isinstance(value, list):
            self.out += b"]"
            self.put()
            for start in range(0, len(value), 1000):  # cPickle appended in batches of 1000
                self.out += b"("
                for item in value[start : start + 1000]:
                    self.value(item)
                self.out += b"e"  # APPENDS
        elif isinstance(value, bytes):
            self.string(value)
        elif isinstance(value, int):
            self.int_(value)
        elif isinstance(value, np.ndarray):
            self.array(value)
        else:
            raise TypeError(f"py2_pickle: {type(value).__name__} is not in a CIFAR-10 batch")


def py2_pickle(obj: dict) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) pickled the official CIFAR-10 files."""
    writer = _Writer()
    writer.value(obj)
    return bytes(writer.out + b".")
