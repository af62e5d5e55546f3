"""One agent's data plane: large frames leave as references and arrive fetched.

`outgoing` replaces each frame above `inline_limit` by a `Reference` and holds a sealed
snapshot of it for its receiver; `resolve` turns the references of a message read from
the inbox back into frames, directly from the sender (`Fetcher`) or, when that cannot
be done, through Redis: the receiver asks the sender with a `q` entry in the sender's
inbox, and the sender answers with a `d` entry holding the bytes. A receiver that could
not go direct (unreachable, or `data_plane="redis"`) says so, and its sender then sends
it frames inline for a while (`INLINE_FOR`): the fallback costs one round trip, once.

Waits are bounded by the sender's liveness, not by a fixed time alone: a fetch goes on
while the sender's heartbeat is current and fails (`TransferLost`) once it lapses, so a
sender killed mid-transfer fails its message at the receiver within the failure window.
Frames held for a receiver whose heartbeat lapsed are dropped (`sweep`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from asyncgrad.errors import CodecError, TransferLost
from asyncgrad.transport.data.fetch import Broken, Fetcher, Pusher, Unreachable
from asyncgrad.transport.data.held import Held
from asyncgrad.transport.data.memory import BufferPool, Mappings, Snapshot, snapshot
from asyncgrad.transport.data.pushed import Pushed
from asyncgrad.transport.data.reference import Endpoints, Reference, RefField
from asyncgrad.transport.data.server import DataServer
from asyncgrad.transport.resp import RedisAddress

__all__ = [
    "DEFAULT_INLINE_LIMIT",
    "DataPlane",
    "DataSettings",
    "RefField",
    "TransferLost",
]

logger = logging.getLogger(__name__)

# Frames above this many bytes go direct. Measured (docs/BENCH.md, "inline_limit"): the
# direct path's fixed ~250 us per frame and Redis's copies of the bytes cross about here.
DEFAULT_INLINE_LIMIT: Final = 256 * 1024
INLINE_FOR: Final = 60.0  # s a sender sends inline to a receiver that asked by Redis
REDIS_FETCH_LIMIT: Final = 60.0  # s a fallback fetch waits for a live sender's answer
_HELD_MAX_AGE: Final = 600.0  # s after which a held frame is dropped, receiver alive or not

Mode = Literal["direct", "redis"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class DataSettings:
    """`mode` "direct" uses the data plane, "redis" sends every frame through Redis;
    `host`/`port` is where the data port listens (None: the address this host reaches
    Redis from; 0: any free port). Other agents connect to `$ASYNCGRAD_DATA_HOST` if set,
    else to the address listened on."""

    mode: Mode = "direct"
    inline_limit: int = DEFAULT_INLINE_LIMIT
    host: str | None = None
    port: int = 0
    max_size: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.mode not in ("direct", "redis"):
            raise ValueError(f'data_plane must be "direct" or "redis", not {self.mode!r}')
        if self.inline_limit < 0:
            raise ValueError(f"inline_limit must be >= 0, not {self.inline_limit}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"data_port must be 0..65535, not {self.port}")


Alive = Callable[[str], Awaitable[bool]]
Control = Callable[[str, list[Any]], asyncio.Future[Any]]


class DataPlane:
    """The data plane of agent `name`. `alive(agent)` says whether an agent's heartbeat is
    current; `control(agent, fields)` adds an entry with `fields` to its inbox."""

    def __init__(
        self,
        name: str,
        address: RedisAddress,
        settings: DataSettings,
        alive: Alive,
        control: Control,
        check_every: float,
    ) -> None:
        self.name = name
        self.settings = settings
        self._address = address
        self._alive = alive
        self._control = control
        self._check_every = check_every
        self.direct = settings.mode == "direct"
        self.counts: Counter[str] = Counter()
        self._counting = threading.Lock()  # serving threads count too
        self.held = Held()
        self.pushed = Pushed()
        self.mappings = Mappings()
        self._pool = BufferPool()
        self._pusher = Pusher(self._acked)
        # Agents on this host, by name: their local sockets, learned from their references.
        self._local_peers: dict[str, bytes] = {}
        self._remote_peers: set[str] = set()  # and those on other hosts
        self.endpoints = Endpoints.here(name, b"", "", 0, b"")
        self._server: DataServer | None = None
        self._fetcher: Fetcher | None = None
        self._inline_until: dict[str, float] = {}
        self._awaiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._sweeping: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()

    # *** lifecycle ***

    async def start(self) -> None:
        if not self.direct:
            return
        server_tls, client_tls, fingerprint, tcp = _tls_contexts(self._address)
        server = self._server = DataServer(
            self.name, self.held, self.pushed, self._count_served, server_tls
        )
        unix = server.start_local()
        host, port = "", 0
        if tcp:
            facing = _facing(self._address)
            bound_host, port = server.start_tcp(self.settings.host or facing, self.settings.port)
            wildcard = bound_host in ("0.0.0.0", "::")
            host = os.environ.get("ASYNCGRAD_DATA_HOST") or (facing if wildcard else bound_host)
        self.endpoints = Endpoints.here(self.name, unix, host, port, fingerprint)
        self._fetcher = Fetcher(
            self.endpoints, self.mappings, self.pushed, server.poll, client_tls, self._count_fetched
        )
        loop = asyncio.get_running_loop()

        def drained() -> None:
            loop.call_soon_threadsafe(self._drained.set)

        self.held.on_drained = drained
        self._sweeping = loop.create_task(self._sweep())
        logger.debug(
            "event=data_plane agent=%s tcp=%s:%d tls=%s",
            self.name, host or "-", port, server_tls is not None,
        )  # fmt: skip

    async def drain(self, within: float) -> None:
        """Until every held frame was fetched, for `within` s at most."""
        if not len(self.held) or self._server is None:
            return
        self._drained.clear()
        if not len(self.held):
            return
        try:
            async with asyncio.timeout(within):
                await self._drained.wait()
        except TimeoutError:
            logger.info("event=data_undrained agent=%s frames=%d", self.name, len(self.held))

    async def close(self) -> None:
        """Stop serving and fetching: what is held is dropped, what is awaited fails."""
        if self._sweeping is not None:
            self._sweeping.cancel()
            await asyncio.gather(self._sweeping, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self._fetcher is not None:
            self._fetcher.close()
        self._pusher.close()
        self.pushed.close()
        self.held.close()
        for future in self._awaiting.values():
            if not future.done():
                future.set_exception(TransferLost(f"agent {self.name!r} closed"))

    # *** out ***

    def outgoing(
        self, dest: str, frames: list[bytes | memoryview]
    ) -> tuple[list[bytes | memoryview], list[bytes]]:
        """`frames` with each frame above the limit (not the first: the header) replaced
        by a reference, and the tokens of the frames now held for `dest`."""
        limit = self.settings.inline_limit
        if self._server is None or all(len(f) <= limit for f in frames[1:]):
            return frames, []
        until = self._inline_until.get(dest)
        if until is not None:
            if time.monotonic() < until:
                self.counts["sent_inline"] += 1
                return frames, []
            del self._inline_until[dest]
        out = list(frames)
        tokens: list[bytes] = []
        for i in range(1, len(out)):
            frame = out[i]
            if len(frame) <= limit:
                continue
            try:
                snap = self.mappings.find(frame)
                if snap is not None:
                    self.counts["sent_shared"] += 1  # a received frame sent on: no copy
                elif dest in self._remote_peers:
                    snap = Snapshot.of_bytes(frame, self._pool)  # it only goes to a socket
                else:
                    snap = snapshot(frame)
            except OSError as e:  # out of memory or of file descriptors: Redis takes it
                logger.warning("event=snapshot_failed agent=%s error=%s", self.name, e)
                continue
            token = self.held.add(dest, snap)
            tokens.append(token)
            out[i] = Reference(self.endpoints, token, snap.length).encode()
            self.counts["sent_direct"] += 1
            unix = self._local_peers.get(dest)
            if unix is not None and snap.fd >= 0:
                # Offered now, it is there when the message is read: no round trip then.
                if self._pusher.offer(unix, token, snap):
                    self.counts["sent_offered"] += 1
                else:
                    del self._local_peers[dest]
        return out, tokens

    def _acked(self, token: bytes) -> None:
        """A receiver took an offered frame: it is no longer held here."""
        if self.held.take(token) is not None:
            self.held.sent(token)
            self._count_served("local")

    def stored(self, tokens: list[bytes], entry: Any) -> None:
        """The message of `tokens` was stored as `entry` (an id), or failed (an error)."""
        if isinstance(entry, bytes):
            self.held.stored(tokens, entry)
        else:
            self.held.drop(tokens)

    def withdrawn(self, dest: str, entry: bytes) -> None:
        self.held.drop_entry(dest, entry)

    def on_request(
        self, requester: str, token: bytes, unreachable: bool, drop: bool
    ) -> list[Any] | None:
        """A receiver asks by Redis for a frame (or, `drop`, declines it): the fields of
        the answer to send it (None: none)."""
        if drop:
            self.held.drop_for(requester, token)
            return None
        if unreachable:
            self._inline_until[requester] = time.monotonic() + INLINE_FOR
        snap = self.held.take(token, requester)
        if snap is None:
            return [b"d", token, b"x", b"no frame held under that token (fetched before?)"]
        try:
            view = snap.view()
        finally:
            self.held.sent(token)
        self.counts["served_redis"] += 1
        return [b"d", token, b"b", view]

    # *** in ***

    def resolve_now(self, frames: list[Any]) -> bool | CodecError:
        """Resolve `frames` at once if every reference among them was offered (the usual
        case on one host): True; else False, having taken nothing (`resolve` then), or
        the error that the message carries instead."""
        fetcher = self._fetcher
        if fetcher is None:
            return False
        try:
            refs, size = _references(frames)
        except CodecError:
            return False  # `resolve` says so
        if size > self.settings.max_size:
            return False  # `resolve` declines the frames and says so
        local = all(fetcher.path(ref) == "local" for _, ref in refs)
        if not local or not fetcher.offered([ref for _, ref in refs]):
            return False
        for _, ref in refs:
            self._learn(ref, "local")
        try:
            for i, ref in refs:
                view = fetcher.take_offered(ref)
                if view is None:  # only this loop takes offers: it was there a moment ago
                    raise Broken(f"the offer of {ref.sender.agent!r} went")
                frames[i] = view
        except Broken as e:
            return TransferLost(str(e))
        return True

    async def resolve(self, frames: list[Any]) -> None:
        """Replace, in place, each reference among `frames` by its frame. `TransferLost` if
        one cannot be had (its bytes never arrive); a `CodecError` (nothing fetched) for a
        malformed reference, or frames over `max_size` in all, as the codec would say."""
        refs, size = _references(frames)
        if size > self.settings.max_size:
            for _, ref in refs:  # so that their senders stop holding them
                decline = [b"q", ref.token, b"a", self.name, b"drop", b"1"]
                self._control(ref.sender.agent, decline).add_done_callback(_ignore)
            raise CodecError(
                f"message of {size} bytes exceeds the limit of {self.settings.max_size}"
            )
        for i, ref in refs:
            frames[i] = await self._fetch(ref)

    def on_data(self, token: bytes, data: bytes | None, error: str) -> None:
        """A sender's answer by Redis (`d` entry): the bytes, or why there are none."""
        future = self._awaiting.pop(token, None)
        if future is None or future.done():
            return
        if data is None:
            future.set_exception(TransferLost(error))
        else:
            future.set_result(data)

    async def _fetch(self, ref: Reference) -> bytes | memoryview:
        sender = ref.sender.agent
        fetcher = self._fetcher
        unreachable = True
        path = fetcher.path(ref) if fetcher is not None else None
        if fetcher is not None and path is not None:
            self._learn(ref, path)
            cancel = asyncio.Event()
            task = asyncio.ensure_future(fetcher.fetch(ref, cancel))
            try:
                return await self._while_alive(task, sender, cancel)
            except Unreachable as e:
                logger.info(
                    "event=data_unreachable agent=%s sender=%s error=%s", self.name, sender, e
                )
            except Broken as e:
                # The sender gives a frame whose sending broke back: Redis may still get it.
                logger.info("event=data_broken agent=%s sender=%s error=%s", self.name, sender, e)
                unreachable = False
        return await self._via_redis(ref, unreachable)

    def _learn(self, ref: Reference, path: str) -> None:
        """Where `ref`'s sender is: on this host (its frames to it are offered as they
        leave) or on another (they are copied to memory, not to a file)."""
        sender = ref.sender.agent
        if path == "local":
            self._local_peers[sender] = ref.sender.unix
            self._remote_peers.discard(sender)
        else:
            self._remote_peers.add(sender)

    async def _via_redis(self, ref: Reference, unreachable: bool) -> bytes:
        sender = ref.sender.agent
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._awaiting[ref.token] = future
        asking = [b"q", ref.token, b"a", self.name, b"u", b"1" if unreachable else b"0"]
        stored = self._control(sender, asking)
        stored.add_done_callback(lambda s: _fail_with(future, s, sender))
        try:
            async with asyncio.timeout(REDIS_FETCH_LIMIT):
                data = await self._while_alive(future, sender, None)
        except TimeoutError:
            raise TransferLost(
                f"{sender!r} did not send a frame of {ref.size} bytes within "
                f"{REDIS_FETCH_LIMIT:g} s"
            ) from None
        finally:
            self._awaiting.pop(ref.token, None)
        self.counts["fetched_redis"] += 1
        return data

    async def _while_alive(
        self, waiting: asyncio.Future[_T], sender: str, cancel: asyncio.Event | None
    ) -> _T:
        """`waiting`'s result; `TransferLost` once `sender`'s heartbeat lapsed first."""
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=self._check_every)
                if done:
                    return waiting.result()
                if not await self._still_alive(sender):
                    raise TransferLost(f"{sender!r} stopped heartbeating before its frame arrived")
        finally:
            if not waiting.done():
                if cancel is not None:
                    cancel.set()
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

    async def _still_alive(self, agent: str) -> bool:
        try:
            return await self._alive(agent)
        except Exception as e:  # Redis unreachable: no evidence either way, wait on
            logger.debug("event=liveness_unknown agent=%s peer=%s error=%s", self.name, agent, e)
            return True

    # *** upkeep ***

    async def _sweep(self) -> None:
        """Drop frames held for receivers that are gone (or for far too long)."""
        while True:
            # A frame is fetched within milliseconds of its message being read; one held a
            # few heartbeats long may have lost its receiver (one EXISTS per receiver).
            every = max(self._check_every * 4, 1.0)
            await asyncio.sleep(every)  # upkeep timer
            for dest, tokens in self.held.waiting(every).items():
                if not await self._still_alive(dest):
                    self.held.drop(tokens)
                    logger.info(
                        "event=data_dropped agent=%s receiver=%s frames=%d why=receiver_gone",
                        self.name, dest, len(tokens),
                    )  # fmt: skip
            for tokens in self.held.waiting(_HELD_MAX_AGE).values():
                self.held.drop(tokens)
            self.pushed.expire(_HELD_MAX_AGE)

    def _count_served(self, path: str) -> None:
        with self._counting:
            self.counts[f"served_{path}"] += 1

    def _count_fetched(self, path: str) -> None:
        self.counts[f"fetched_{path}"] += 1


def _references(frames: list[Any]) -> tuple[list[tuple[int, Reference]], int]:
    """The references among `frames` (with where they stand), and the bytes the frames
    come to once fetched; a `CodecError` for a malformed reference."""
    refs = [(i, Reference.decode(f)) for i, f in enumerate(frames) if type(f) is RefField]
    inline = sum(len(f) for f in frames if type(f) is not RefField)
    return refs, inline + sum(ref.size for _, ref in refs)


def _ignore(stored: asyncio.Future[Any]) -> None:
    """A decline that could not be stored: its frame is dropped by the sender's sweep."""
    if not stored.cancelled():
        stored.exception()


def _fail_with(future: asyncio.Future[bytes], stored: asyncio.Future[Any], sender: str) -> None:
    error = None if stored.cancelled() else stored.exception()
    if error is not None and not future.done():
        future.set_exception(TransferLost(f"cannot ask {sender!r} for the frame: {error}"))


def _facing(address: RedisAddress) -> str:
    """The local address this host reaches Redis from (no packet is sent)."""
    if address.path is not None:
        return "127.0.0.1"
    host, port = address.seeds[0] if address.seeds else (address.host, address.port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, target = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            found: str = probe.getsockname()[0]
            return found
    except OSError:
        return "127.0.0.1"


def _tls_contexts(
    address: RedisAddress,
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None, bytes, bool]:
    """(server, client, fingerprint, tcp): the TLS contexts of direct TCP connections, the
    SHA-256 of the certificate this agent's port presents, and whether there may be
    direct TCP at all. With a TLS control plane they use TLS too, with the agent's own
    certificate both ways; without one, no direct TCP.

    The port requires the receiver's certificate, signed by the CA. The receiver checks
    the port's certificate by its fingerprint, which came in the reference (through the
    authenticated control plane), not by the CA: agents' certificates are usually client
    certificates, which a TLS client refuses as a server's ("unsuitable purpose")."""
    tls = address.tls
    if tls is None:
        return None, None, b"", True
    certfile, ca = tls.get("ssl_certfile"), tls.get("ssl_ca_certs")
    if not certfile or not ca:
        return None, None, b"", False
    keyfile = tls.get("ssl_keyfile")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    server.load_cert_chain(certfile, keyfile)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.load_cert_chain(certfile, keyfile)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the fingerprint is checked instead (fetch.py)
    with open(certfile) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return server, client, hashlib.sha256(der).digest(), True
