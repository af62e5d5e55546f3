"""The memory a direct transfer moves: sealed anonymous files (memfd) and read-only maps.

A frame that leaves by the data plane is first copied into a memfd (`snapshot`): what
arrives is the value at the send, as through Redis, whatever the sender does with its
array afterwards. The file is then sealed (no write, no resize), so a receiver may map
it and trust that it never changes under its arrays nor shrinks into a SIGBUS.

A received frame is a read-only shared map of such a file (`Mapped`): a receiver on the
same host maps the sender's file itself (no copy), one on another host receives the
bytes into a file of its own and seals it alike. Each map keeps its file open while it
lives, so a frame sent on as it came (an echo, a pipeline stage passing activations on)
travels as that same file, without a copy (`Mappings.find`).

A memfd has no name: when the last process holding it or mapping it exits, by SIGKILL
too, the kernel frees it. Nothing is left behind to clean up.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import threading
import weakref
from dataclasses import dataclass

__all__ = ["SEALS", "Mapped", "Mappings", "Snapshot", "check_sealed", "snapshot"]

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_PAGE = mmap.ALLOCATIONGRANULARITY


@dataclass(slots=True)
class Snapshot:
    """`length` bytes at `offset` of the sealed memfd `fd` (owned: `close` it)."""

    fd: int
    offset: int
    length: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def view(self) -> memoryview:
        """The bytes, read-only (for a transfer that falls back to Redis)."""
        return Mapped.of(self.fd, self.offset, self.length).view


def snapshot(frame: bytes | memoryview) -> Snapshot:
    """The frame's bytes in a new sealed memfd (for a frame that is not a view of a file
    received already: `Mappings.find`)."""
    view = memoryview(frame).cast("B")
    fd = os.memfd_create("asyncgrad-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, len(view))
        done = 0
        # pwrite is one copy, kernel side; faster than writing through a map here (tmpfs
        # pages are allocated as they are written either way).
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return Snapshot(fd, 0, len(view))


def check_sealed(fd: int) -> None:
    """`ValueError` unless the file can never change or shrink under a map of it."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & SEALS != SEALS:
        raise ValueError(f"the file passed is not sealed (seals {seals:#x})")


class _Map(mmap.mmap):
    """An mmap that weakrefs can follow."""


@dataclass(slots=True)
class Mapped:
    """A read-only map of a file: `view` is the `length` bytes at `offset` it was asked for."""

    map: mmap.mmap
    view: memoryview

    @classmethod
    def of(cls, fd: int, offset: int, length: int) -> Mapped:
        """Map `fd` read-only. The pages are in memory already (the sender's, or written
        by the receive): a page is mapped when first read, so a frame passed on unread
        costs no page table at all."""
        start = offset - offset % _PAGE
        size = offset + length - start
        if length <= 0:
            raise ValueError("an empty frame is never sent directly")
        m = _Map(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
        return cls(m, memoryview(m)[offset - start :])


@dataclass(slots=True)
class _Kept:
    start: int  # the address of the view's first byte
    end: int
    file_offset: int  # where in the file that byte is
    fd: int
    map: weakref.ref[mmap.mmap]


class Mappings:
    """The read-only maps of received frames alive here, by address, each with its file
    open: a frame that lies in one of them is sent on as that file (`find`), no copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # fetch threads keep maps too
        self._starts: list[int] = []
        self._kept: list[_Kept] = []

    def keep(self, fd: int, offset: int, length: int) -> memoryview:
        """Map `length` bytes at `offset` of `fd` read-only; the map owns `fd` from now on
        (closed when the map is collected). Returns the bytes."""
        try:
            mapped = Mapped.of(fd, offset, length)
        except BaseException:
            os.close(fd)
            raise
        start = _address(mapped.view)
        kept = _Kept(start, start + length, offset, fd, weakref.ref(mapped.map))
        with self._lock:
            i = bisect.bisect(self._starts, start)
            self._starts.insert(i, start)
            self._kept.insert(i, kept)
        weakref.finalize(mapped.map, self._forget, kept)
        return mapped.view

    def _forget(self, kept: _Kept) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, kept.start)
            while i < len(self._kept) and self._starts[i] == kept.start:
                if self._kept[i] is kept:
                    del self._starts[i], self._kept[i]
                    break
                i += 1
        os.close(kept.fd)

    def __len__(self) -> int:
        return len(self._kept)

    def find(self, frame: bytes | memoryview) -> Snapshot | None:
        """The frame as a snapshot of the file of the map it lies in, if any (a new fd).
        The frame is a view of that map, so the map (and its fd) live while this runs."""
        if not self._starts or type(frame) is bytes:
            return None
        view = memoryview(frame)
        if not view.readonly or not view.c_contiguous:
            return None
        address = _address(view)
        with self._lock:
            i = bisect.bisect(self._starts, address) - 1
            if i < 0:
                return None
            kept = self._kept[i]
            if address + view.nbytes > kept.end or kept.map() is None:
                return None
            return Snapshot(os.dup(kept.fd), kept.file_offset + address - kept.start, view.nbytes)


class _Buffer(ctypes.Structure):
    """CPython's Py_buffer (obj as a plain pointer: ctypes must not count its reference)."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_Buffer), ctypes.c_int)
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_Buffer),)


def _address(view: memoryview) -> int:
    """Where a buffer's first byte is (Python has no public way to ask a read-only one)."""
    buffer = _Buffer()
    _get_buffer(view, ctypes.byref(buffer), 0)  # PyBUF_SIMPLE; raises if not a buffer
    try:
        return buffer.buf or 0
    finally:
        _release_buffer(ctypes.byref(buffer))
