"""The receiver's side of a direct transfer: fetching a referenced frame from its sender.

On the sender's host (`Endpoints.shares_memory_with`), the request goes over its local
socket, on the event loop, and the answer is the sender's sealed memfd itself, mapped
read-only here: no byte is copied (often the frame was offered before it was asked for:
`Pusher`). From another host (or network namespace) the bytes come over TCP, in a
thread, into a buffer that only read-only views are made of; either way a received
frame can be sent on without a copy (`memory.Mappings`).

Connections are kept per sender and reused, one request at a time each. A fetch that
cannot be made (refused, unreachable, TLS on one side only) raises `Unreachable`: the
caller falls back to Redis. One that breaks off (the sender died mid-transfer) raises
`Broken`. Either leaves nothing open: a fd received is mapped or closed.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from asyncgrad.transport.data.memory import Mappings, Snapshot, check_sealed
from asyncgrad.transport.data.protocol import (
    ACK_MAGIC,
    BYTES,
    FD,
    FOUND,
    HEADER,
    MAGIC,
    PUSH,
    PUSH_MAGIC,
    fds_of,
    recv_exact,
)
from asyncgrad.transport.data.pushed import Pushed
from asyncgrad.transport.data.reference import TOKEN_BYTES, Endpoints, Reference

__all__ = ["Broken", "Fetcher", "Pusher", "Unreachable"]

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
        pushed: Pushed,
        poll: Callable[[], None],
        tls: ssl.SSLContext | None,
        fetched: Callable[[str], None],
    ) -> None:
        self.here = here
        self._mappings = mappings
        self._pushed = pushed
        self._poll = poll
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
            self._fetched("tcp")
        else:
            raise Unreachable("no direct path to the sender")
        return view

    def close(self) -> None:
        self._local.close()
        self._tcp.close()

    # *** local ***

    def offered(self, refs: list[Reference]) -> bool:
        """Whether every one of `refs` was offered here (an offer may wait on the local
        socket, not yet read: it is read now)."""
        if not all(self._pushed.has(ref.token) for ref in refs):
            self._poll()
        return all(self._pushed.has(ref.token) for ref in refs)

    def take_offered(self, ref: Reference) -> memoryview | None:
        """The frame of `ref`, if it was offered (`Broken` if the offer is not a valid
        frame); its sender is told it can stop holding it."""
        offer = self._pushed.claim(ref.token)
        if offer is None:
            return None
        view = self._map(ref, offer.fd, offer.offset, offer.length)
        self._fetched("local")
        self._fetched("offered")
        return view

    async def _fetch_local(self, ref: Reference) -> memoryview:
        if self.offered([ref]) and (view := self.take_offered(ref)) is not None:
            return view
        key = ref.sender.unix
        for attempt in (1, 2):
            sock = self._local.get(key)
            fresh = sock is None
            if sock is None:
                sock = _seqpacket()
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
            self._fetched("local")
            return view
        raise AssertionError("unreachable")

    async def _ask_local(self, sock: socket.socket, ref: Reference) -> memoryview:
        try:
            sock.send(MAGIC + ref.token)  # one small message into an idle socket: never blocks
        except OSError:  # the sender closed it already (no slot free; or a kept one)
            raise _Stale from None
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(4 * 4))
                break
            except (BlockingIOError, InterruptedError):
                readable = loop.create_future()
                loop.add_reader(sock, readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(sock)
            except OSError as e:
                raise Broken(f"local socket of {ref.sender.agent!r}: {e}") from e
        fds = fds_of(ancillary)
        try:
            if not data:
                raise _Stale
            if len(data) != HEADER.size:
                raise Broken(f"{ref.sender.agent!r} answered with a malformed header")
            magic, status, how, offset, length = HEADER.unpack(data)
            if magic != MAGIC or status != FOUND:
                raise Broken(f"{ref.sender.agent!r} no longer holds the frame (token unknown)")
            if how != FD or len(fds) != 1:
                raise Broken(f"{ref.sender.agent!r} answered with a malformed frame")
            return self._map(ref, fds.pop(), offset, length)
        finally:
            for fd in fds:
                os.close(fd)

    def _map(self, ref: Reference, fd: int, offset: int, length: int) -> memoryview:
        """The frame in `fd` (owned: mapped or closed), once it is a sealed file that holds
        exactly the frame the reference declared."""
        try:
            if length != ref.size:
                raise ValueError(f"{length} bytes where the reference said {ref.size}")
            check_sealed(fd)
            if os.fstat(fd).st_size < offset + length:
                raise ValueError("the file is shorter than the frame")
        except (ValueError, OSError) as e:
            os.close(fd)
            raise Broken(f"{ref.sender.agent!r} passed a bad file: {e}") from e
        return self._mappings.keep(fd, offset, length)

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
                presented = sock.getpeercert(binary_form=True) or b""
                if hashlib.sha256(presented).digest() != sender.cert:
                    raise ssl.SSLError(
                        f"the port at {sender.host}:{sender.port} is not {sender.agent!r}'s: "
                        "its certificate is not the one its reference names"
                    )
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
        # Heap memory, not a file: receiving into a fresh file's pages is ~3x slower here,
        # and the frame is only ever read (its views are read-only) or sent on as it is.
        buffer = self.fetcher._mappings.receive_buffer(length)
        got = 0
        with memoryview(buffer) as view:
            try:
                while got < length:
                    n = sock.recv_into(view[got:], length - got)
                    if n == 0:
                        raise Broken(
                            f"{ref.sender.agent!r} closed the connection after "
                            f"{got} of {length} bytes"
                        )
                    got += n
            except OSError as e:
                raise Broken(f"data connection to {ref.sender.agent!r}: {e}") from e
        return self.fetcher._mappings.keep_buffer(buffer)


def _given_up(transfer: asyncio.Future[Any]) -> None:
    """A transfer nobody waits for any more ended (woken by its abort, as a rule)."""
    if not transfer.cancelled() and (error := transfer.exception()) is not None:
        logger.debug("event=transfer_given_up error=%r", error)


def _seqpacket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    return sock


class Pusher:
    """Offers frames to receivers on this host as they leave (`protocol.PUSH`), one kept
    connection per receiver, and hands each ack to `acked(token)`."""

    def __init__(self, acked: Callable[[bytes], None]) -> None:
        self._acked = acked
        self._conns: dict[bytes, socket.socket] = {}

    def offer(self, unix: bytes, token: bytes, snapshot: Snapshot) -> bool:
        """Offer a held frame; False if it could not be (the receiver pulls it then)."""
        sock = self._conns.get(unix)
        try:
            if sock is None:
                sock = _seqpacket()
                sock.connect(unix)  # a unix socket connects at once, or refuses
                self._conns[unix] = sock
                asyncio.get_running_loop().add_reader(sock, self._read_acks, unix, sock)
            push = PUSH.pack(PUSH_MAGIC, token, snapshot.offset, snapshot.length)
            fds = array.array("i", [snapshot.fd])
            sock.sendmsg([push], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError:  # refused, full, or gone: an offer is never needed
            if sock is not None:
                self._close(unix, sock)
            return False
        return True

    def _read_acks(self, unix: bytes, sock: socket.socket) -> None:
        while True:
            try:
                ack = sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                ack = b""
            if len(ack) != len(ACK_MAGIC) + TOKEN_BYTES or ack[:4] != ACK_MAGIC:
                self._close(unix, sock)  # closed, or not an ack: offer no more there
                return
            self._acked(ack[4:])

    def _close(self, unix: bytes, sock: socket.socket) -> None:
        if self._conns.get(unix) is sock:
            del self._conns[unix]
            asyncio.get_running_loop().remove_reader(sock)
        sock.close()

    def close(self) -> None:
        for unix, sock in list(self._conns.items()):
            self._close(unix, sock)
