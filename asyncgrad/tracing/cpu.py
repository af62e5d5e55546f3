"""How long a thread has waited for a core: the run-queue time the kernel keeps for it
(`/proc/thread-self/schedstat`, its second field, in ns; Linux).

A span that covers a wait cannot tell a worker that waited for a message from one that
was runnable and waited for a CPU (five processes and Redis on two cores do that often);
the difference of this counter over the span can. One file descriptor, kept open and read
again from offset 0 (~0.6 µs), for the thread that first asked: the event loop's.
"""

from __future__ import annotations

import os
import threading

__all__ = ["RunQueue"]


class RunQueue:
    """The run-queue wait of the thread that first asks (None elsewhere, or off Linux)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._thread = 0
        self._absent = False

    def waited_ns(self) -> int | None:
        """Nanoseconds this thread has waited for a core since it started."""
        if self._absent:
            return None
        if self._fd is None:
            try:
                self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._absent = True
                return None
            self._thread = threading.get_native_id()
        if threading.get_native_id() != self._thread:
            return None
        try:
            return int(os.pread(self._fd, 64, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._absent = True
