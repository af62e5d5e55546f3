"""The memory a direct transfer moves: snapshots of frames sent, and received frames.

A frame that leaves by the data plane is first copied (`snapshot`): what arrives is the
value at the send, as through Redis, whatever the sender does with its array afterwards.
For a receiver on this host the copy is a memfd, an anonymous file, sealed (no write,
no resize) so that the receiver may map it and trust that it never changes under its
arrays nor shrinks into a SIGBUS. For a receiver known to be on another host it is an
immutable `bytes` (`Snapshot.of_bytes`): heap memory the allocator reuses is several
times faster to write than a fresh file's pages, and the bytes only go to a socket.

A received frame is read-only: on this host, a map of the sender's memfd itself (no
copy); from another host, a buffer the bytes were received into (`Mappings.keep_buffer`).
Both are remembered by address while they live (`Mappings`), so a frame sent on as it
came (an echo, a pipeline stage passing activations on) is not copied again: it is held
as that same file or buffer (`Mappings.find`).

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
from typing import Any, TypeVar

__all__ = ["SEALS", "BufferPool", "Mapped", "Mappings", "Snapshot", "check_sealed", "snapshot"]

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_PAGE = mmap.ALLOCATIONGRANULARITY
# From this size, memory of its own in huge pages (as numpy does for its arrays): fresh
# 4 KiB pages cost a fault each, and receiving 64 MiB into them took 2.4x as long here.
_LARGE = 4 << 20


@dataclass(slots=True)
class Snapshot:
    """`length` bytes: at `offset` of the sealed memfd `fd` (owned: `close` it), or, with
    `fd` -1, the immutable `buffer`."""

    fd: int
    offset: int
    length: int
    buffer: memoryview | None = None

    pool: BufferPool | None = None  # where `buffer`'s memory goes back once sent

    @classmethod
    def of_bytes(cls, frame: bytes | memoryview, pool: BufferPool) -> Snapshot:
        """A copy in memory of this process, from `pool` (warm pages: several times faster
        to write than fresh ones); an immutable `bytes` frame is its own snapshot."""
        if type(frame) is bytes:
            return cls(-1, 0, len(frame), memoryview(frame))
        view = memoryview(frame).cast("B")
        buffer = pool.take(len(view))
        buffer[:] = view
        return cls(-1, 0, len(view), buffer.toreadonly(), pool)

    def close(self, sent: bool = False) -> None:
        """Done with it. `sent`: its bytes are out, nothing refers to its buffer any more,
        which may then serve the next snapshot."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if sent and self.pool is not None and self.buffer is not None:
            self.pool.give(self.buffer)
        self.buffer = None

    def view(self) -> memoryview:
        """The bytes, read-only."""
        if self.buffer is not None:
            return self.buffer
        return Mapped.of(self.fd, self.offset, self.length).view

    def as_file(self) -> Snapshot:
        """This snapshot as a sealed memfd (a copy, if it is a buffer)."""
        return self if self.buffer is None else snapshot(self.buffer)


class BufferPool:
    """Memory that snapshots for other hosts were made in and sent from, for the next ones:
    at most `keep` bytes of it, in buffers of the sizes last sent."""

    def __init__(self, keep: int = 256 << 20) -> None:
        self._keep = keep
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()  # buffers come back from serving threads

    def take(self, size: int) -> memoryview:
        with self._lock:
            free = self._free.get(size)
            m = free.pop() if free else None
        return memoryview(m if m is not None else _anonymous(size, mmap.mmap))

    def give(self, buffer: memoryview) -> None:
        m = buffer.obj
        assert isinstance(m, mmap.mmap)
        with self._lock:
            kept = sum(size * len(free) for size, free in self._free.items())
            if kept + len(m) <= self._keep:
                self._free.setdefault(len(m), []).append(m)


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


class _Received(bytearray):
    """A buffer a frame was received into, that weakrefs can follow. Only read-only views
    of it are ever handed out, so nothing changes it once received."""


@dataclass(slots=True)
class Mapped:
    """A read-only map of a file: `view` is the `length` bytes at `offset` it was asked for."""

    map: mmap.mmap
    view: memoryview

    @classmethod
    def of(cls, fd: int, offset: int, length: int) -> Mapped:
        """Map `fd` read-only. The pages are in memory already (the sender's): a page is
        mapped when first read, so a frame passed on unread costs no page table at all."""
        start = offset - offset % _PAGE
        size = offset + length - start
        if length <= 0:
            raise ValueError("an empty frame is never sent directly")
        m = _Map(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
        return cls(m, memoryview(m)[offset - start :])


@dataclass(slots=True)
class _Kept:
    start: int  # the address of the frame's first byte
    end: int
    file_offset: int  # where in the file that byte is (-1: a buffer, not a file)
    fd: int
    holder: weakref.ref[Any]  # the map or the buffer


class Mappings:
    """The received frames alive here, by address: a frame that lies in one of them is
    sent on as that file or buffer (`find`), without a copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # fetch threads keep frames too
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
        self._add(_Kept(start, start + length, offset, fd, weakref.ref(mapped.map)), mapped.map)
        return mapped.view

    @staticmethod
    def receive_buffer(length: int) -> bytearray | mmap.mmap:
        """A buffer to receive a frame into, for `keep_buffer` once it is filled: from the
        heap, whose pages the allocator reuses; a large one as a map of huge pages."""
        return _anonymous(length, _Map) if length >= _LARGE else _Received(length)

    def keep_buffer(self, buffer: bytearray | mmap.mmap) -> memoryview:
        """A read-only view of a buffer from `receive_buffer`, filled: the frame."""
        assert type(buffer) in (_Received, _Map)
        view = memoryview(buffer).toreadonly()
        start = _address(view)
        self._add(_Kept(start, start + len(view), -1, -1, weakref.ref(buffer)), buffer)
        return view

    def _add(self, kept: _Kept, holder: Any) -> None:
        with self._lock:
            i = bisect.bisect(self._starts, kept.start)
            self._starts.insert(i, kept.start)
            self._kept.insert(i, kept)
        weakref.finalize(holder, self._forget, kept)

    def _forget(self, kept: _Kept) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, kept.start)
            while i < len(self._kept) and self._starts[i] == kept.start:
                if self._kept[i] is kept:
                    del self._starts[i], self._kept[i]
                    break
                i += 1
        if kept.fd >= 0:
            os.close(kept.fd)

    def __len__(self) -> int:
        return len(self._kept)

    def find(self, frame: bytes | memoryview) -> Snapshot | None:
        """The frame as a snapshot of the file or buffer it was received in, if any (a
        new fd). The frame is a view of it, so it (and its fd) live while this runs."""
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
            holder = kept.holder()
            if address + view.nbytes > kept.end or holder is None:
                return None
            at = address - kept.start
            if kept.fd < 0:
                data = memoryview(holder).toreadonly()[at : at + view.nbytes]
                return Snapshot(-1, 0, view.nbytes, data)
            return Snapshot(os.dup(kept.fd), kept.file_offset + at, view.nbytes)


_M = TypeVar("_M", bound=mmap.mmap)


def _anonymous(size: int, kind: type[_M]) -> _M:
    """Private memory of this process, in huge pages where the kernel allows them. (Not
    mmap's default MAP_SHARED: shared anonymous memory is tmpfs, 4 KiB pages only here.)"""
    m = kind(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= _LARGE and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


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
