"""The receiver's side of a direct transfer: fetching a referenced frame from its sender.

On the sender's host (`Endpoints.shares_memory_with`), the request goes over its local
socket, on the event loop, and the answer is the sender's sealed memfd itself, mapped
read-only here: no byte is copied. From another host (or network namespace) the bytes
come over TCP, in a thread, into a memfd of the receiver's own, sealed and mapped alike;
so every received frame is a read-only map that can be sent on without a copy.

Connections are kept per sender and reused, one request at a time each. A fetch that
cannot be made (refused, unreachable, TLS on one side only) raises `Unreachable`: the
caller falls back to Redis. One that breaks off (the sender died mid-transfer) raises
`Broken`. Either leaves nothing open: a fd received is mapped or closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import mmap
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from asyncgrad.transport.data.memory import SEALS, Mappings, check_sealed
from asyncgrad.transport.data.protocol import BYTES, FD, FOUND, HEADER, MAGIC, recv_exact
from asyncgrad.transport.data.reference import Endpoints, Reference

__all__ = ["Broken", "Fetcher", "Unreachable"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0
_IDLE = 5.0  # a kept connection idle longer is closed (the server may have dropped it)
_KEEP = 4  # kept connections per sender


class Unreachable(Exception):
    """The sender cannot be reached directly from here: fall back to Redis."""


class Broken(Exception):
    """The transfer began and broke off, or the answer was not a valid frame."""


class _Pool:
    """Idle connections by sender address, with when each was last used."""

    def __init__(self) -> None:
        self._idle: dict[object, collections.deque[tuple[float, socket.socket]]] = {}

    def get(self, key: object) -> socket.socket | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            used, sock = idle.pop()
            if now - used < _IDLE:
                return sock
            sock.close()
        return None

    def put(self, key: object, sock: socket.socket) -> None:
        idle = self._idle.setdefault(key, collections.deque())
        idle.append((time.monotonic(), sock))
        while len(idle) > _KEEP:
            idle.popleft()[1].close()

    def close(self) -> None:
        for idle in self._idle.values():
            for _, sock in idle:
                sock.close()
        self._idle.clear()


class Fetcher:
    """Fetches frames for the agent at `here`; `fetched(path)` counts each one."""

    def __init__(
        self,
        here: Endpoints,
        mappings: Mappings,
        tls: ssl.SSLContext | None,
        fetched: Callable[[str], None],
    ) -> None:
        self.here = here
        self._mappings = mappings
        self._tls = tls
        self._fetched = fetched
        self._local = _Pool()
        self._tcp = _Pool()  # touched by fetch threads: deque ops are atomic

    def path(self, ref: Reference) -> str | None:
        """How `ref` would be fetched directly: "local", "tcp", or None (not at all)."""
        sender = ref.sender
        if self.here.shares_memory_with(sender):
            return "local"
        if sender.port and sender.tls == (self._tls is not None):
            return "tcp"
        return None

    async def fetch(self, ref: Reference, cancel: asyncio.Event) -> memoryview:
        """The frame, read-only; `cancel` set aborts a TCP transfer under way."""
        path = self.path(ref)
        if path == "local":
            view = await self._fetch_local(ref)
        elif path == "tcp":
            view = await self._fetch_tcp(ref, cancel)
        else:
            raise Unreachable("no direct path to the sender")
        self._fetched(path)
        return view

    def close(self) -> None:
        self._local.close()
        self._tcp.close()

    # *** local ***

    async def _fetch_local(self, ref: Reference) -> memoryview:
        key = ref.sender.unix
        for attempt in (1, 2):
            sock = self._local.get(key)
            fresh = sock is None
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, key)
                except OSError as e:
                    sock.close()
                    raise Unreachable(f"local socket of {ref.sender.agent!r}: {e}") from e
            try:
                view = await self._ask_local(sock, ref)
            except _Stale:
                sock.close()
                if fresh or attempt == 2:
                    raise Broken(f"{ref.sender.agent!r} closed its local socket") from None
                continue
            except BaseException:
                sock.close()
                raise
            self._local.put(key, sock)
            return view
        raise AssertionError("unreachable")

    async def _ask_local(self, sock: socket.socket, ref: Reference) -> memoryview:
        try:
            sock.send(MAGIC + ref.token)  # 20 bytes into an idle socket: never blocks
        except OSError:  # the sender closed it already (no slot free; or a kept one)
            raise _Stale from None
        loop = asyncio.get_running_loop()
        data = b""
        fds: list[int] = []
        try:
            while len(data) < HEADER.size:
                try:
                    chunk, ancillary, _, _ = sock.recvmsg(
                        HEADER.size - len(data), socket.CMSG_SPACE(4 * 4)
                    )
                except (BlockingIOError, InterruptedError):
                    readable = loop.create_future()
                    loop.add_reader(sock, readable.set_result, None)
                    try:
                        await readable
                    finally:
                        loop.remove_reader(sock)
                    continue
                except OSError as e:
                    raise Broken(f"local socket of {ref.sender.agent!r}: {e}") from e
                fds += _fds_of(ancillary)
                if not chunk:
                    if not data:
                        raise _Stale
                    raise Broken(f"{ref.sender.agent!r} closed its socket mid-answer")
                data += chunk
            magic, status, how, offset, length = HEADER.unpack(data)
            if magic != MAGIC or status != FOUND:
                raise Broken(f"{ref.sender.agent!r} no longer holds the frame (token unknown)")
            if how != FD or len(fds) != 1 or length != ref.size:
                raise Broken(f"{ref.sender.agent!r} answered with a malformed frame")
            fd = fds.pop()
            try:
                check_sealed(fd)
                if os.fstat(fd).st_size < offset + length:
                    raise ValueError("the file is shorter than the frame")
            except (ValueError, OSError) as e:
                os.close(fd)
                raise Broken(f"{ref.sender.agent!r} passed a bad file: {e}") from e
            return self._mappings.keep(fd, offset, length)
        finally:
            for fd in fds:
                os.close(fd)

    # *** TCP ***

    async def _fetch_tcp(self, ref: Reference, cancel: asyncio.Event) -> memoryview:
        transfer = _TcpTransfer(self, ref)
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, transfer.run)
        aborted = asyncio.ensure_future(cancel.wait())
        either: set[asyncio.Future[Any]] = {done, aborted}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Given up from outside (the sender stopped beating) before `cancel` was seen:
            # the thread must be woken all the same, else it waits on a silent sender for
            # ever, holding its socket and one of the loop's executor threads.
            transfer.abort()
            done.add_done_callback(_given_up)
            raise
        finally:
            aborted.cancel()
        if not done.done():
            transfer.abort()
            with contextlib.suppress(Exception):
                await done
            raise Broken("given up: the sender stopped answering")
        return await done


class _Stale(Exception):
    """A kept connection the server had closed: ask again on a new one."""


class _TcpTransfer:
    """One TCP fetch, run in a thread; `abort` (from the loop) wakes it."""

    def __init__(self, fetcher: Fetcher, ref: Reference) -> None:
        self.fetcher = fetcher
        self.ref = ref
        self.sock: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if (sock := self.sock) is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> memoryview:
        sender = self.ref.sender
        key = (sender.host, sender.port)
        pool = self.fetcher._tcp
        for attempt in (1, 2):
            sock = pool.get(key)
            fresh = sock is None
            if sock is None:
                sock = self._connect()
            self.sock = sock
            if self.aborted:
                sock.close()
                raise Broken("aborted")
            try:
                view = self._ask(sock)
            except _Stale:
                sock.close()
                if fresh or attempt == 2:
                    raise Broken(f"{sender.agent!r} closed its data connection") from None
                continue
            except BaseException:
                sock.close()
                raise
            pool.put(key, sock)
            return view
        raise AssertionError("unreachable")

    def _connect(self) -> socket.socket:
        sender = self.ref.sender
        try:
            sock = socket.create_connection((sender.host, sender.port), CONNECT_TIMEOUT)
        except OSError as e:
            raise Unreachable(f"{sender.host}:{sender.port} of {sender.agent!r}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)  # stalls are watched by the loop, which aborts
            if (tls := self.fetcher._tls) is not None:
                sock.settimeout(CONNECT_TIMEOUT)
                sock = tls.wrap_socket(sock, server_hostname=sender.host)
                sock.settimeout(None)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise Unreachable(f"TLS with {sender.agent!r} at {sender.host}: {e}") from e
        return sock

    def _ask(self, sock: socket.socket) -> memoryview:
        ref = self.ref
        try:
            sock.sendall(MAGIC + ref.token)
            head = recv_exact(sock, HEADER.size)
        except OSError as e:
            raise Broken(f"data connection to {ref.sender.agent!r}: {e}") from e
        if head is None:
            raise _Stale
        magic, status, how, _, length = HEADER.unpack(head)
        if magic != MAGIC or status != FOUND:
            raise Broken(f"{ref.sender.agent!r} no longer holds the frame (token unknown)")
        if how != BYTES or length != ref.size:
            raise Broken(f"{ref.sender.agent!r} answered with a malformed frame")
        fd = os.memfd_create("asyncgrad-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, length)
            writable = mmap.PROT_READ | mmap.PROT_WRITE
            with mmap.mmap(fd, length, mmap.MAP_SHARED, writable) as m, memoryview(m) as view:
                got = 0
                while got < length:
                    n = sock.recv_into(view[got:], length - got)
                    if n == 0:
                        raise Broken(
                            f"{ref.sender.agent!r} closed the connection after "
                            f"{got} of {length} bytes"
                        )
                    got += n
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError as e:
            os.close(fd)
            raise Broken(f"data connection to {ref.sender.agent!r}: {e}") from e
        except BaseException:
            os.close(fd)
            raise
        return self.fetcher._mappings.keep(fd, 0, length)


def _given_up(transfer: asyncio.Future[Any]) -> None:
    """A transfer nobody waits for any more ended (woken by its abort, as a rule)."""
    if not transfer.cancelled() and (error := transfer.exception()) is not None:
        logger.debug("event=transfer_given_up error=%r", error)


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += list(memoryview(data[:usable]).cast("i"))
    return fds
