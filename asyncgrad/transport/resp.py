"""A lean Redis client: RESP2 over one socket, parsed by hiredis, pipelined.

Why not redis-py on the hot path: its per-command overhead is 70-180 us on this kind of
machine (docs/REDIS_FLOOR.md), as much as a whole Redis round trip. Here a command is
`pack_command` plus one future; every command issued in one event-loop tick leaves in a
single write, and replies are matched to waiters in order. Large buffers are written as
they are (a memoryview of an array is never joined into a new bytes object).

`RedisAddress` parses the URL forms asyncgrad accepts:
`redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS; query parameters
`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs=none|optional|required`,
`ssl_check_hostname=false`), `unix:///path/to/redis.sock[?db=N&password=...]`, and for a
Redis Cluster `redis+cluster://[user:password@]host:port[,host:port...]` (or
`rediss+cluster://`, with the TLS parameters of `rediss://`): the nodes listed are seeds,
from which asyncgrad.transport.cluster learns the rest.
"""

from __future__ import annotations

import asyncio
import collections
import platform
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from asyncgrad.errors import TransportError

__all__ = [
    "DEFAULT_URL",
    "Connection",
    "ConnectionLost",
    "RedisAddress",
    "ReplyError",
    "SyncConnection",
]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
# Above this, an argument is written as its own buffer instead of being packed (copied).
_LARGE = 64 * 1024
_KEEP_BUFFER = 4 << 20
# Closing a TLS connection waits for Redis's close_notify: asyncio's default of 30 s made
# an agent's shutdown take a minute when Redis was unreachable (a plain socket closes at once).
_TLS_SHUTDOWN_TIMEOUT = 1.0
Arg = bytes | memoryview | str | int | float
# hiredis's stubs declare a one-element tuple; it takes any number of arguments.
_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)
# SO_TIMESTAMPNS: the kernel stamps each packet as it arrives (CLOCK_REALTIME), and
# recvmsg hands the stamp over. Python names no constant; 35 is Linux's generic value
# (x86-64, arm64; a few other architectures number their socket options otherwise).
_SO_TIMESTAMPNS = 35
_STAMPED = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
_TIMESPEC = struct.Struct("@qq")


class ConnectionLost(TransportError):
    """The connection to Redis closed or could not be made."""


class ReplyError(TransportError):
    """Redis answered a command with an error (`.code` is its first word, e.g. NOGROUP)."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


@dataclass(frozen=True)
class RedisAddress:
    """Where a Redis server is and how to log in to it."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: dict[str, str] | None = field(default=None, hash=False)
    # A Redis Cluster's seed nodes (host, port); empty for a single server.
    seeds: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        username = unquote(parts.username) if parts.username else query.get("username")
        password = unquote(parts.password) if parts.password else query.get("password")
        if parts.scheme in ("redis+cluster", "rediss+cluster"):
            seeds = _seeds(url, parts.netloc.rpartition("@")[2])
            if parts.path.strip("/") not in ("", "0") or query.get("db", "0") != "0":
                raise ValueError(f"{url!r}: a Redis Cluster has only database 0")
            tls = {k: v for k, v in query.items() if k.startswith("ssl_")}
            return cls(
                host=seeds[0][0],
                port=seeds[0][1],
                username=username or None,
                password=password,
                tls=tls if parts.scheme == "rediss+cluster" else None,
                seeds=seeds,
            )
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError(f"{url!r}: a unix URL needs a socket path")
            db = int(query.get("db", "0"))
            return cls(path=parts.path, db=db, username=username or None, password=password)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"{url!r}: unsupported scheme {parts.scheme!r} "
                "(use redis://, rediss://, unix:// or redis+cluster://)"
            )
        path_db = parts.path.lstrip("/")
        tls = {k: v for k, v in query.items() if k.startswith("ssl_")}
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path_db or query.get("db", "0")),
            username=username or None,
            password=password,
            tls=tls if parts.scheme == "rediss" else None,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.get("ssl_ca_certs"))
        if certfile := self.tls.get("ssl_certfile"):
            ctx.load_cert_chain(certfile, self.tls.get("ssl_keyfile"))
        reqs = self.tls.get("ssl_cert_reqs", "required").lower()
        if self.tls.get("ssl_check_hostname", "true").lower() in ("false", "0", "no") or (
            reqs == "none"
        ):
            ctx.check_hostname = False
        ctx.verify_mode = {
            "none": ssl.CERT_NONE,
            "optional": ssl.CERT_OPTIONAL,
            "required": ssl.CERT_REQUIRED,
        }[reqs]
        return ctx

    def login_commands(self, client_name: str | None) -> list[tuple[Arg, ...]]:
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            user = (self.username,) if self.username else ()
            commands.append(("AUTH", *user, self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        if client_name:
            commands.append(("CLIENT", "SETNAME", client_name))
        return commands

    def __str__(self) -> str:
        if self.seeds:
            return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.seeds)
        where = f"unix://{self.path}" if self.path else f"{self.host}:{self.port}"
        return f"{where}/{self.db}"


def _seeds(url: str, hosts: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port`; a port may be left out (6379), IPv6 hosts go in brackets."""
    seeds = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if not colon or host.endswith(":") or "]" in port:  # no port, or a bare IPv6 address
            host, port = item, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: {item!r} is not host:port")
        seeds.append((host, int(port)))
    return tuple(seeds)


def encode_command(args: tuple[Arg, ...]) -> list[bytes | memoryview]:
    """RESP for one command; large buffers stay separate, uncopied."""
    for arg in args:  # a plain loop: this runs for every command
        if type(arg) is memoryview and arg.nbytes > _LARGE:
            break
    else:
        return [_pack(args)]
    chunks: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
    small: list[Arg] = []
    for arg in args:
        if type(arg) is memoryview and arg.nbytes > _LARGE:
            if small:
                chunks.append(_pack(tuple(small)).split(b"\r\n", 1)[1])
                small = []
            chunks += [b"$%d\r\n" % arg.nbytes, arg, b"\r\n"]
        else:
            small.append(arg)
    if small:
        chunks.append(_pack(tuple(small)).split(b"\r\n", 1)[1])
    return chunks


Waiter = asyncio.Future[Any] | Callable[[Any], None] | None


class Connection(asyncio.Protocol):
    """One pipelined connection. `command()` queues; the queue leaves once per loop tick.

    A waiter is a future, a callback (given the reply or the `ReplyError`), or `None` for
    a reply nobody reads: fire-and-forget commands still need their place in the order.
    `on_lost` is called once the connection is gone, however that happened.
    """

    def __init__(
        self, name: str | None = None, on_lost: Callable[[Connection], None] | None = None
    ) -> None:
        self.name = name
        self.on_lost = on_lost
        self._reader = hiredis.Reader(replyError=ReplyError)
        # Keep the parse buffer between large replies (hiredis frees it above 16 KiB by
        # default): reallocating it per message costs page faults that doubled B3's time.
        self._reader.setmaxbuf(_KEEP_BUFFER)
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._out: list[bytes | memoryview] = []
        self._flush_handle: asyncio.Handle | None = None
        # While held, commands queue and leave only with an explicit flush() (one write).
        self.held = False
        self._transport: asyncio.Transport | None = None
        self._lost: BaseException | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def open(
        cls,
        address: RedisAddress,
        *,
        name: str | None = None,
        connect_timeout: float = 10.0,
        on_lost: Callable[[Connection], None] | None = None,
    ) -> Connection:
        """Connect, log in and select the database; `ConnectionLost` if that fails."""
        loop = asyncio.get_running_loop()
        conn: Connection | None = None
        opened = False
        try:
            async with asyncio.timeout(connect_timeout):
                if address.path:
                    _, conn = await loop.create_unix_connection(lambda: cls(name), address.path)
                else:
                    ctx = address.ssl_context()
                    _, conn = await loop.create_connection(
                        lambda: cls(name),
                        address.host,
                        address.port,
                        ssl=ctx,
                        server_hostname=address.host if ctx else None,
                        ssl_shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT if ctx else None,
                    )
                for command in address.login_commands(name):
                    await conn.execute(*command)
                conn.on_lost, opened = on_lost, True
                return conn
        except (OSError, TimeoutError, ssl.SSLError, ReplyError, ConnectionLost) as e:
            if isinstance(e, ReplyError):
                raise ConnectionLost(f"Redis at {address} refused the login: {e}") from e
            if str(e).startswith(_NOT_REDIS):
                raise ConnectionLost(f"{address} {e}; check the URL's host and port") from e
            if isinstance(e, TimeoutError) and conn is not None:
                # The port accepted the connection, but nothing answered the login: not a
                # Redis (or one stalled); an empty "cannot connect" said neither.
                raise ConnectionLost(
                    f"connected to {address} but got no answer within {connect_timeout:g} s "
                    "(not a Redis server?); check the URL's host and port"
                ) from e
            reason = str(e) or type(e).__name__
            raise ConnectionLost(f"cannot connect to Redis at {address}: {reason}") from e
        finally:
            if conn is not None and not opened:  # the login failed, or was cancelled
                conn.close()

    # *** asyncio.Protocol ***

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        reader, waiters = self._reader, self._waiters
        reader.feed(data)
        while (reply := _next_reply(reader, data)) is not False:
            if isinstance(reply, _NotRedis):
                self._lost = ConnectionLost(str(reply))
                if self._transport is not None:
                    self._transport.abort()  # connection_lost fails the waiters with it
                return
            waiter = waiters.popleft()
            if waiter is None:
                continue
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    if isinstance(reply, ReplyError):
                        waiter.set_exception(reply)
                    else:
                        waiter.set_result(reply)
            else:
                waiter(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is None or not str(self._lost).startswith(_NOT_REDIS):
            self._lost = ConnectionLost(
                f"connection {self.name or ''} to Redis lost" + (f": {exc}" if exc else "")
            )
        self._transport = None
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(self._lost)
            elif waiter is not None:
                waiter(self._lost)
        self.closed.set()
        if self.on_lost is not None:
            self.on_lost(self)

    # *** commands ***

    @property
    def is_open(self) -> bool:
        """False from the moment `close()` is called or the connection is lost."""
        return self._transport is not None and not self._transport.is_closing()

    def command(self, *args: Arg, waiter: Waiter = None) -> None:
        """Queue a command; its reply goes to `waiter` (at once if the connection is gone)."""
        if not self.is_open:
            lost = self._lost or ConnectionLost(f"connection {self.name or ''} to Redis is closed")
            if isinstance(waiter, asyncio.Future):
                waiter.set_exception(lost)
            elif waiter is not None:
                waiter(lost)
            return
        self._out += encode_command(args)
        self._waiters.append(waiter)
        if self._flush_handle is None and not self.held:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """Queue a command and return the future of its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.command(*args, waiter=future)
        return future

    def flush(self) -> None:
        """Write what is queued now, instead of at the end of this loop tick."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
        # Also what was queued while `held` (no flush was scheduled for it).
        if handle is not None or self._out:
            self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.writelines(out)

    def close(self) -> None:
        self.flush()
        if self._transport is not None:
            self._transport.close()


class SyncConnection:
    """A blocking connection for a thread that must not depend on the event loop."""

    def __init__(self, address: RedisAddress, *, name: str | None = None, timeout: float = 5.0):
        self._reader = hiredis.Reader(replyError=ReplyError)
        sock: socket.socket | None = None
        try:
            if address.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(address.path)
            else:
                sock = socket.create_connection((address.host, address.port), timeout=timeout)
                if ctx := address.ssl_context():
                    sock = ctx.wrap_socket(sock, server_hostname=address.host)
            self._sock = sock
            # Plain TCP only: TLS has no recvmsg, and a unix socket gets no stamps.
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            self._stamped = tcp and not isinstance(sock, ssl.SSLSocket) and _stamp(sock)
            for command in address.login_commands(name):
                self.execute(*command)
        except (OSError, TransportError) as e:
            if sock is not None:
                sock.close()
            if isinstance(e, ReplyError):
                raise ConnectionLost(f"Redis at {address} refused the login: {e}") from e
            if str(e).startswith(_NOT_REDIS):
                raise ConnectionLost(f"{address} {e}; check the URL's host and port") from e
            if isinstance(e, ConnectionLost):
                raise
            raise ConnectionLost(f"cannot connect to Redis at {address}: {e}") from e

    def execute(self, *args: Arg) -> Any:
        return self._execute(args, False)[0]

    def execute_timed(self, *args: Arg) -> tuple[Any, int | None]:
        """`execute`, and by when its reply had arrived, on the monotonic clock (ns): the
        kernel's stamp of the reply's last packet, which a thread that waited for the GIL
        (or a CPU) before it read the reply leaves behind. None where the socket tells no
        arrival (TLS, a unix socket, not Linux)."""
        return self._execute(args, self._stamped)

    def _execute(self, args: tuple[Arg, ...], timed: bool) -> tuple[Any, int | None]:
        arrived = None
        try:
            self._sock.sendall(_pack(args))
            data = b""
            while (reply := _next_reply(self._reader, data)) is False:
                if timed:
                    data, ancillary, _, _ = self._sock.recvmsg(65536, _ANCILLARY)
                    arrived = _arrival(ancillary)
                else:
                    data = self._sock.recv(65536)
                if not data:
                    raise ConnectionLost("Redis closed the connection")
                self._reader.feed(data)
        except OSError as e:
            raise ConnectionLost(f"Redis connection failed: {e}") from e
        if isinstance(reply, _NotRedis):
            raise ConnectionLost(str(reply))
        if isinstance(reply, ReplyError):
            raise reply
        return reply, arrived

    def close(self) -> None:
        self._sock.close()


_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


def _stamp(sock: socket.socket) -> bool:
    """Have the kernel stamp the packets `sock` receives; whether it will."""
    if not _STAMPED:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """A packet's kernel stamp (CLOCK_REALTIME) as a time on the monotonic clock: the
    latest it can be (the realtime clock read no later than the monotonic one)."""
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            seconds, nanos = _TIMESPEC.unpack(value[: _TIMESPEC.size])
            realtime, monotonic = time.time_ns(), time.monotonic_ns()
            return int(seconds) * 1_000_000_000 + int(nanos) - realtime + monotonic
    return None


class _NotRedis(str):
    """What `_next_reply` returns when the bytes are not RESP: a description of them."""


# How that description begins (a connection lost for that reason is told by it).
_NOT_REDIS = "answered with something that is not Redis"


def _next_reply(reader: hiredis.Reader, data: bytes) -> Any:
    """The next reply parsed (False: none yet), or `_NotRedis` saying what came instead."""
    try:
        return reader.gets()
    except hiredis.ProtocolError:
        first = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0][:60]
        return _NotRedis(f"{_NOT_REDIS}: {first.decode(errors='replace')!r}")
