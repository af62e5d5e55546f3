"""Serving held frames: a local socket that passes memfds, and a TCP port that sends bytes.

The local socket is an abstract unix socket (Linux): it has no file to leave behind, and
only processes in this network namespace can connect to it. It answers on the event
loop, from callbacks: a request is 20 bytes, an answer a header and a file descriptor;
it also takes frames offered by their senders (`protocol.PUSH`) as `Pushed` offers. As
on the TCP port, a connection that sends nothing for `REQUEST_TIMEOUT` is closed, and at
most `MAX_CONNECTIONS` are served at once.

The TCP port serves other hosts (and other network namespaces). Each connection gets a
thread of its own, since a frame of megabytes goes out in one `sendfile` (or through TLS
when the control plane uses it) without holding up the loop. A connection must send a
whole request within `REQUEST_TIMEOUT`, and at most `MAX_CONNECTIONS` are served at once:
one that presents no valid token gets a short answer and costs a thread for seconds at
most.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable

from asyncgrad.transport.data.held import Held
from asyncgrad.transport.data.memory import Snapshot
from asyncgrad.transport.data.protocol import (
    BYTES,
    FD,
    FOUND,
    HEADER,
    MAGIC,
    PUSH,
    PUSH_MAGIC,
    REQUEST_BYTES,
    UNKNOWN,
    fds_of,
    recv_exact,
)
from asyncgrad.transport.data.pushed import Offer, Pushed

__all__ = ["MAX_CONNECTIONS", "REQUEST_TIMEOUT", "DataServer"]

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # for a request to arrive (the first, or the next on a kept connection)
SEND_TIMEOUT = 60.0  # for a receiver to take the next bytes of a frame
MAX_CONNECTIONS = 64  # of each kind, served at once; more are closed at once

_UNKNOWN = HEADER.pack(MAGIC, UNKNOWN, 0, 0, 0)


class DataServer:
    """Serves the frames of `held` to whoever presents their token."""

    def __init__(
        self,
        agent: str,
        held: Held,
        pushed: Pushed,
        served: Callable[[str], None],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._agent = agent
        self._held = held
        self._pushed = pushed
        self._served = served  # told "local" or "tcp" per frame served
        self._tls = tls
        self._local: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._local_conns: set[_LocalConnection] = set()
        self._tcp_conns: set[socket.socket] = set()
        self._tcp_lock = threading.Lock()
        self.unix = b""
        self.host, self.port = "", 0

    def start_local(self) -> bytes:
        """Listen on a fresh abstract unix socket; returns its name."""
        name = b"\0asyncgrad-data-" + os.urandom(12).hex().encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(name)
        sock.listen(128)
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock, self._accept_local)
        self._local, self.unix = sock, name
        return name

    def start_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on `host:port` (port 0: any free one); returns the address bound."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        asyncio.get_running_loop().add_reader(sock, self._accept_tcp)
        self._tcp = sock
        self.host, self.port = sock.getsockname()[:2]
        return self.host, self.port

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in (self._local, self._tcp):
            if listener is not None:
                loop.remove_reader(listener)
                listener.close()
        self._local = self._tcp = None
        for conn in list(self._local_conns):
            conn.close()
        with self._tcp_lock:
            conns = list(self._tcp_conns)
        for sock in conns:
            # Wakes the thread blocked on it; the thread closes it.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # *** local ***

    def _accept_local(self) -> bool:
        assert self._local is not None
        try:
            sock, _ = self._local.accept()
        except (BlockingIOError, InterruptedError):
            return False
        if len(self._local_conns) >= MAX_CONNECTIONS:
            sock.close()
            return True
        self._local_conns.add(_LocalConnection(self, sock))
        return True

    def offered_by(self, sock: socket.socket) -> bool:
        return self._pushed.from_connection(sock)

    def owns(self, conn: _LocalConnection) -> bool:
        return conn in self._local_conns

    def drop(self, conn: _LocalConnection) -> None:
        self._local_conns.discard(conn)

    def poll(self) -> None:
        """Accept and read, now, what waits on the local socket (an offer may be there
        that the loop has not got to yet)."""
        while self._local is not None and self._accept_local():
            pass
        for conn in list(self._local_conns):
            conn.readable()

    def handle_local(self, conn: _LocalConnection, message: bytes, fds: list[int]) -> bool:
        """Answer a request or keep an offer (taking its fd out of `fds`); False: close
        the connection."""
        if len(message) == PUSH.size and message[:4] == PUSH_MAGIC and len(fds) == 1:
            _, token, offset, length = PUSH.unpack(message)
            self._pushed.add(token, Offer(fds.pop(), offset, length, conn.sock))
            return True
        if len(message) != REQUEST_BYTES or message[:4] != MAGIC or fds:
            return False
        token = message[4:]
        snapshot = self._held.take(token)
        if snapshot is None:
            conn.sock.send(_UNKNOWN)
            return True
        try:
            if snapshot.fd < 0:  # a frame received from another host, sent on here
                snapshot = self._held.as_file(token, snapshot.as_file())
            header = HEADER.pack(MAGIC, FOUND, FD, snapshot.offset, snapshot.length)
            rights = array.array("i", [snapshot.fd])
            conn.sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        except BaseException:
            self._held.restore(token)
            raise
        self._held.sent(token)
        self._served("local")
        return True

    # *** TCP ***

    def _accept_tcp(self) -> None:
        assert self._tcp is not None
        try:
            sock, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        with self._tcp_lock:
            if len(self._tcp_conns) >= MAX_CONNECTIONS:
                sock.close()
                return
            self._tcp_conns.add(sock)
        thread = threading.Thread(
            target=self._serve_tcp, args=(sock,), name=f"asyncgrad-data-{self._agent}", daemon=True
        )
        thread.start()

    def _serve_tcp(self, raw: socket.socket) -> None:
        sock = raw
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(REQUEST_TIMEOUT)
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
            while (request := recv_exact(sock, REQUEST_BYTES)) is not None:
                if request[:4] != MAGIC:
                    return
                token = request[4:]
                snapshot = self._held.take(token)
                if snapshot is None:
                    sock.sendall(_UNKNOWN)
                    continue
                try:
                    sock.settimeout(SEND_TIMEOUT)
                    self._send_bytes(sock, snapshot)
                except BaseException:
                    self._held.restore(token)
                    raise
                self._held.sent(token, recycle=True)
                self._served("tcp")
                sock.settimeout(REQUEST_TIMEOUT)
        except (OSError, ssl.SSLError) as e:
            # The receiver went away, sent nothing in time, or failed TLS: its loss.
            logger.debug("event=data_connection_ended agent=%s error=%r", self._agent, e)
        finally:
            with self._tcp_lock:
                self._tcp_conns.discard(raw)
            sock.close()

    def _send_bytes(self, sock: socket.socket, snapshot: Snapshot) -> None:
        sock.sendall(HEADER.pack(MAGIC, FOUND, BYTES, 0, snapshot.length))
        if isinstance(sock, ssl.SSLSocket) or snapshot.fd < 0:
            sock.sendall(snapshot.view())
            return
        # The kernel sends from the memfd's pages: no copy through this process.
        with os.fdopen(snapshot.fd, "rb", closefd=False) as file:
            sent = sock.sendfile(file, snapshot.offset, snapshot.length)
        if sent != snapshot.length:
            raise ConnectionError(f"sent {sent} of {snapshot.length} bytes")


class _LocalConnection:
    """One peer's connection to the local socket, served from loop callbacks: its requests
    are answered, its pushes kept as offers."""

    def __init__(self, server: DataServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(sock, self.readable)
        # Else a peer that sends nothing holds a slot for ever: with MAX_CONNECTIONS of
        # them, every receiver on this host would fetch through Redis.
        self._idle = loop.call_later(REQUEST_TIMEOUT, self._idled)

    def readable(self) -> None:
        """Handle every message waiting (also called by `DataServer.poll`)."""
        while self.server.owns(self):
            try:
                data, ancillary, _, _ = self.sock.recvmsg(64, socket.CMSG_SPACE(4 * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            fds = fds_of(ancillary)
            self._idle.cancel()
            self._idle = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._idled)
            try:
                if not data or not self.server.handle_local(self, data, fds):
                    self.close()
            except OSError:  # the peer stopped reading its answers, or left
                self.close()
            finally:
                for fd in fds:
                    os.close(fd)

    def _idled(self) -> None:
        if self.server.offered_by(self.sock):  # its acks are still to go out on it
            self._idle = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._idled)
        else:
            self.close()

    def close(self) -> None:
        self._idle.cancel()
        if self.server.owns(self):
            self.server.drop(self)
            asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
