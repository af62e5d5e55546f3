"""The data plane against peers that are not agents (SECURITY.md's threat: anyone on the
host, or on the network, who can connect to a worker's data sockets) and against
references no agent made (written into an inbox by hand).

A live worker's local socket (abstract, `@asyncgrad-data-...`) and TCP data port are found
as an attacker finds them, in /proc (`tests.leftovers`); a used token is read from an
inbox while its receiver is frozen. Each test says what the attacker got (nothing: an
UNKNOWN answer or a close), how fast, and that the worker served and fetched on.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aredis

from asyncgrad.codec import Codec
from asyncgrad.messages import Call, Header, Kind
from asyncgrad.transport import dead_letters, inbox
from asyncgrad.transport.data.protocol import FD, FOUND, HEADER, MAGIC, UNKNOWN
from asyncgrad.transport.data.reference import Endpoints, Reference
from asyncgrad.transport.data.server import MAX_CONNECTIONS, REQUEST_TIMEOUT
from asyncgrad.transport.writer import DEAD_LETTER_BYTES
from tests import fault_funcs  # noqa: F401 - the test's agent serves fault.echo
from tests.conftest import DEADLINE, WorkerProcess, eventually
from tests.data_fault_funcs import BIG, digest, pattern
from tests.leftovers import Listening, data_sockets, fd_targets, memfds
from tests.test_data_faults import FAST, FUNCS, reference_in
from tests.test_faults import logged

pytestmark = pytest.mark.timeout(40)

UNKNOWN_ANSWER = HEADER.pack(MAGIC, UNKNOWN, 0, 0, 0)
Address = bytes | tuple[str, int]


def address_of(sockets: Listening, path: str) -> Address:
    """The worker's local socket (`path` "local") or its TCP data port ("tcp")."""
    if path == "local":
        (name,) = sockets.unix
        return b"\0" + name[1:].encode()
    (host_port,) = sockets.tcp
    return host_port


def dial(address: Address) -> socket.socket:
    """A connection to a data socket: a local one carries messages (SOCK_SEQPACKET)."""
    local = isinstance(address, bytes)
    sock = socket.socket(
        socket.AF_UNIX if local else socket.AF_INET,
        socket.SOCK_SEQPACKET if local else socket.SOCK_STREAM,
    )
    sock.settimeout(DEADLINE)
    sock.connect(address)
    return sock


def ask(sock: socket.socket, request: bytes) -> tuple[bytes, int]:
    """Send `request`; the answer's bytes (a header, or less if the worker closed: a
    close with bytes unread is a reset) and how many fds came with it (closed here)."""
    sock.sendall(request)
    data, fds = b"", 0
    while len(data) < HEADER.size:
        try:
            chunk, ancillary, _, _ = sock.recvmsg(HEADER.size - len(data), socket.CMSG_SPACE(64))
        except ConnectionResetError:
            break
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                passed = array.array("i", payload[: len(payload) - len(payload) % 4])
                for fd in passed:
                    os.close(fd)
                fds += len(passed)
        if not chunk:
            break
        data += chunk
    return data, fds


def closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the worker closes `sock` (which must send nothing meanwhile); fails
    after `limit` s."""
    began = time.monotonic()
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(4096):
            pytest.fail(f"the worker answered {chunk!r}")
    except TimeoutError:
        pytest.fail(f"still open after {limit} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - began


async def echo_ok(agent: Any, to: str, seed: int) -> None:
    """8 MiB to `to` and back, exact."""
    back = await agent.rpc_async(to, "fault.echo", args=(pattern(seed),))
    assert digest(back) == digest(pattern(seed))


# *** tokens ***


@pytest.mark.parametrize("path", ["local", "tcp"])
async def test_a_request_without_a_valid_token_gets_unknown_and_nothing_else(
    path: str, spawn_worker: Callable[..., WorkerProcess], make_agent: Any,
    redis_client: aredis.Redis, namespace: str,
) -> None:  # fmt: skip
    """On one kept connection to the worker's data socket: no token (zeros), a random
    one, and a real one its receiver already used (read from the receiver's inbox while
    it was frozen) each get the 24-byte UNKNOWN answer, no file and no byte more, at once.
    The worker serves 8 MiB both ways after."""
    w = spawn_worker("w", *FUNCS)
    driver = spawn_worker("driver", *FUNCS)
    client = await make_agent("client")
    sockets = data_sockets(w.pid)
    started, release = f"{namespace}:started", f"{namespace}:release"
    outcome = asyncio.ensure_future(
        client.rpc_async(
            "driver", "data.call", args=("w", "data.pattern_after", (started, release, 1))
        )
    )
    await redis_client.blpop([started], DEADLINE)
    os.kill(driver.pid, signal.SIGSTOP)
    try:
        await redis_client.rpush(release, 1)
        _, ref = await reference_in(redis_client, inbox(namespace, "driver"))
    finally:
        os.kill(driver.pid, signal.SIGCONT)
    result = await outcome
    assert result["ok"] and result["digest"] == digest(pattern(1)), result  # token used
    # What the reference advertises is what /proc shows the worker listens on.
    assert "@" + ref.sender.unix[1:].decode() in sockets.unix
    assert (ref.sender.host, ref.sender.port) in sockets.tcp
    with dial(address_of(sockets, path)) as sock:
        for token in (bytes(16), secrets.token_bytes(16), ref.token):
            began = time.monotonic()
            assert await asyncio.to_thread(ask, sock, MAGIC + token) == (UNKNOWN_ANSWER, 0)
            assert time.monotonic() - began < 0.5
    await echo_ok(client, "w", 2)


@pytest.mark.parametrize("path", ["local", "tcp"])
async def test_garbage_on_a_data_connection_closes_it(
    path: str, spawn_worker: Callable[..., WorkerProcess], make_agent: Any
) -> None:
    """A request that does not start with the protocol's magic (an HTTP request, random
    bytes) is answered by a close, at once (bound 0.5 s), with nothing sent; the worker
    serves 8 MiB both ways after."""
    w = spawn_worker("w", *FUNCS)
    client = await make_agent("client")
    where = address_of(data_sockets(w.pid), path)
    for garbage in (b"GET / HTTP/1.1\r\nHost: w\r\n\r\n", b"\x00" + os.urandom(19)):
        with dial(where) as sock:
            began = time.monotonic()
            assert await asyncio.to_thread(ask, sock, garbage) == (b"", 0)
            assert time.monotonic() - began < 0.5
    await echo_ok(client, "w", 3)


async def test_idle_and_unfinished_data_connections_close_within_the_request_timeout(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any
) -> None:
    """A connection that sends nothing, and one that sends half a request, are closed by
    the worker REQUEST_TIMEOUT (10 s) after they opened (measured 10.0 s; bound + 1.5 s),
    on the local socket as on the TCP port: an idle peer holds a connection slot for that
    long at most. (On the local socket, which carries whole messages, half a request is a
    malformed one: closed at once.) Meanwhile the worker serves 8 MiB both ways."""
    w = spawn_worker("w", *FUNCS)
    client = await make_agent("client")
    sockets = data_sockets(w.pid)
    conns = [dial(address_of(sockets, path)) for path in ("local", "tcp") for _ in range(2)]
    try:
        for sock in conns[1::2]:
            sock.sendall(MAGIC + b"\0" * 5)  # 9 of 20 bytes
        closing = [
            asyncio.ensure_future(asyncio.to_thread(closed_within, s, REQUEST_TIMEOUT + 1.5))
            for s in conns
        ]
        await echo_ok(client, "w", 4)
        idle_local, half_local, idle_tcp, half_tcp = await asyncio.gather(*closing)
        # The local socket carries whole messages: 9 bytes are a malformed request.
        assert half_local < 0.5, half_local
        for after in (idle_local, idle_tcp, half_tcp):
            assert REQUEST_TIMEOUT - 0.5 < after < REQUEST_TIMEOUT + 1.5, after
    finally:
        for sock in conns:
            sock.close()


@pytest.mark.timeout(30)
async def test_more_connections_than_served_do_not_stop_the_worker(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any
) -> None:
    """MAX_CONNECTIONS (64) idle connections to each of the worker's data sockets take all
    its slots; one more is closed at once (bound 0.5 s). Meanwhile the worker serves calls
    and fetches: 8 times 8 MiB to it and back arrive exact (it fetches each argument from
    the client's socket; the client, refused a slot, fetches each reply through Redis), and
    so does 8 MiB that it sends to the client in a call of its own. Once the connections
    close, the client fetches from the worker's local socket again."""
    w = spawn_worker("w", *FUNCS)
    client = await make_agent("client")
    sockets = data_sockets(w.pid)
    held = [dial(address_of(sockets, p)) for p in ("local", "tcp") for _ in range(MAX_CONNECTIONS)]
    try:
        for path in ("local", "tcp"):
            with dial(address_of(sockets, path)) as extra:
                began = time.monotonic()
                assert await asyncio.to_thread(closed_within, extra, DEADLINE) < 0.5
                assert time.monotonic() - began < 0.5
        # The worker's call to the client: the client fetches the argument, and the
        # connection it opens is closed at once (its request meets the close, EPIPE, or
        # is read by nobody, EOF): it asks through Redis.
        served = await client.rpc_async(
            "w", "data.call", args=("client", "fault.echo", ()), kwargs={"big_seed": 6}
        )
        assert served["ok"] and served["digest"] == digest(pattern(6)), served
        assert client.data_plane_stats()["fetched_redis"] == 1
        # Echoes: the worker offers each reply on the client's own socket (it knows the
        # client is on its host now), which the flood does not touch.
        for seed in range(20, 28):
            await echo_ok(client, "w", seed)
        stats = client.data_plane_stats()
        assert (stats["fetched_redis"], stats["fetched_offered"]) == (1, 8), stats
        w_stats = await client.rpc_async("w", "data.stats")  # 8 arguments and the reply
        assert w_stats.get("fetched_local", 0) == 9, w_stats
    finally:
        for sock in held:
            sock.close()
    before = client.data_plane_stats().get("fetched_local", 0)
    await echo_ok(client, "w", 7)
    assert client.data_plane_stats()["fetched_local"] > before


# *** references nobody made ***


@pytest.fixture
def listener() -> Iterator[Callable[[str], tuple[socket.socket, Address]]]:
    """`listener("tcp" | "local")`: a listening socket of the test's own, and its address."""
    made: list[socket.socket] = []

    def listen(path: str) -> tuple[socket.socket, Address]:
        if path == "local":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.bind(b"\0asyncgrad-test-" + secrets.token_hex(8).encode())
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        made.append(sock)
        return sock, sock.getsockname()

    yield listen
    for sock in made:
        sock.close()


def forged_call(ref: bytes) -> dict[bytes, bytes]:
    """The fields of a call entry from "mallory": `fault.echo` of an 8 MiB array whose
    frame is replaced by `ref` (as field `r`)."""
    header = Codec().encode_plain(Header(Kind.CALL, secrets.randbits(40), "mallory").to_wire())
    body, _ = Codec().encode_frames(Call("fault.echo", (np.zeros(BIG),)).to_wire())
    return {b"m": header, b"f": bytes(body), b"r": ref}


def reference(sender: Endpoints, size: int = BIG * 8) -> bytes:
    return Reference(sender, secrets.token_bytes(16), size).encode()


def elsewhere(host: str, port: int) -> Endpoints:
    """A sender on another host (so reached by TCP), named "ghost": nobody runs as it."""
    return Endpoints("ghost", "another-boot", 0, b"", host, port, b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_one(sock: socket.socket, answer: Callable[[socket.socket], None]) -> bytes:
    """Accept one connection on `sock`, read its request, `answer(conn)`, then wait for
    the worker to close it; the request."""
    sock.settimeout(DEADLINE)
    conn, _ = sock.accept()
    with conn:
        conn.settimeout(DEADLINE)
        request = conn.recv(64)
        answer(conn)
        closed_within(conn, DEADLINE)
    return request


def pass_files(files: int, sealed: bool, length: int) -> Callable[[socket.socket], None]:
    """An answer FOUND with `files` memfds named "mallory" of `length` bytes each (passed
    as SCM_RIGHTS), sealed or not, claiming the frame is `BIG * 8` bytes at offset 0."""

    def answer(conn: socket.socket) -> None:
        fds = []
        try:
            for _ in range(files):
                fd = os.memfd_create("mallory", os.MFD_ALLOW_SEALING)
                fds.append(fd)
                os.ftruncate(fd, length)
                if sealed:
                    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
            header = HEADER.pack(MAGIC, FOUND, FD, 0, BIG * 8)
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            conn.sendmsg([header], ancillary)
        finally:
            for fd in fds:
                os.close(fd)

    return answer


def say_nothing(conn: socket.socket) -> None:
    pass


FORGERIES = [
    "garbage",
    "nothing-listening-tcp",
    "nothing-listening-local",
    "over-max-size",
    "silent-sender",
    "unsealed-file",
    "six-files",
    "short-file",
]


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_forged_reference_is_dead_lettered_and_the_worker_serves_on(
    forgery: str, spawn_worker: Callable[..., WorkerProcess], make_agent: Any,
    redis_client: aredis.Redis, namespace: str,
    listener: Callable[[str], tuple[socket.socket, Address]],
) -> None:  # fmt: skip
    """A call entry whose large argument is a reference written by hand: garbage; one to a
    TCP port or a local socket nobody listens on; one declaring more bytes than the
    worker's max_message_size (to a listener the test owns: never connected to); one to a
    sender that takes the request and never answers; or one whose "sender" passes files
    that are unsealed, too many, or shorter than the frame (a map of those could change
    under the worker's arrays or SIGBUS it). The worker dead-letters that one entry
    (within its 1 s failure window: "ghost" never beats), closes what it opened, keeps no
    file it was passed, creates no key for the "sender", and serves 8 MiB both ways
    after; its inbox is left empty. Measured: 3 to 9 ms from the write to the dead letter,
    0.15 s (a heartbeat check) for the silent sender."""
    w = spawn_worker("w", *FUNCS, extra_args=FAST)
    client = await make_agent("client")
    w_inbox, dead = inbox(namespace, "w"), dead_letters(namespace, "w")
    serving: asyncio.Future[bytes] | None = None
    token = b""
    if forgery == "garbage":
        ref = os.urandom(40)
    elif forgery == "nothing-listening-tcp":
        ref = reference(elsewhere("127.0.0.1", free_port()))
    elif forgery == "nothing-listening-local":
        ref = reference(Endpoints.here("ghost", b"\0asyncgrad-data-nobody", "", 0, b""))
    elif forgery == "over-max-size":
        untouched, (host, port) = listener("tcp")
        ref = reference(elsewhere(host, port), size=1 << 40)
    elif forgery == "silent-sender":
        sock, (host, port) = listener("tcp")
        ref = reference(elsewhere(host, port))
        serving = asyncio.ensure_future(asyncio.to_thread(serve_one, sock, say_nothing))
    else:
        sock, name = listener("local")
        assert isinstance(name, bytes)
        ref = reference(Endpoints.here("ghost", name, "", 0, b""))
        answers = {
            "unsealed-file": pass_files(1, sealed=False, length=BIG * 8),
            "six-files": pass_files(6, sealed=True, length=BIG * 8),
            "short-file": pass_files(1, sealed=True, length=4096),
        }
        serving = asyncio.ensure_future(asyncio.to_thread(serve_one, sock, answers[forgery]))
    if forgery != "garbage":
        token = Reference.decode(ref).token
    began = time.monotonic()
    entry = await redis_client.xadd(w_inbox, forged_call(ref))

    async def dead_lettered() -> bool:
        return int(await redis_client.xlen(dead)) >= 1

    await eventually(dead_lettered, "the forged call dead-lettered")
    took = time.monotonic() - began
    assert took < 1.0, took
    ((_, letter),) = await redis_client.xrange(dead)
    assert letter[b"entry"] == entry, letter
    if serving is not None:
        assert await serving == MAGIC + token  # it asked, with the token; then closed
    refused = {
        "unsealed-file": "is not sealed",
        "six-files": "malformed frame",
        "short-file": "shorter than the frame",
    }
    if forgery in refused:  # for that reason, before mapping anything
        assert logged(w, refused[forgery]), w.log
    if forgery == "over-max-size":
        untouched.setblocking(False)
        with pytest.raises(BlockingIOError):
            untouched.accept()  # nobody connected
    await echo_ok(client, "w", 9)
    assert not [t for t in fd_targets(w.pid) if "mallory" in t]
    assert memfds(w.pid) == []
    assert not await redis_client.exists(inbox(namespace, "ghost"), inbox(namespace, "mallory"))

    async def drained() -> bool:
        pending = int((await redis_client.xpending(w_inbox, "asyncgrad"))["pending"])
        return pending == 0 and int(await redis_client.xlen(w_inbox)) == 0

    await eventually(drained, "the worker's inbox empty")
    assert int(await redis_client.xlen(dead)) == 1
    assert int(await redis_client.memory_usage(dead)) < 2 * DEAD_LETTER_BYTES


@contextlib.contextmanager
def draining(worker: WorkerProcess) -> Iterator[None]:
    """Read the worker's log as it is written (a line per dead letter would fill the pipe,
    and the worker would block writing to it); at the end, kill the worker first."""

    def drain() -> None:
        assert worker.process.stderr is not None
        while chunk := os.read(worker.process.stderr.fileno(), 65536):
            worker.log += chunk.decode(errors="replace").splitlines()

    reading = threading.Thread(target=drain, name=f"drain-{worker.name}")
    reading.start()
    try:
        yield
    finally:
        worker.process.kill()
        worker.process.wait(DEADLINE)
        reading.join(DEADLINE)


async def test_a_flood_of_forged_references_leaves_redis_bounded(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str,
) -> None:  # fmt: skip
    """200 forged call entries (each a reference to a port nobody listens on, or garbage)
    written at once: the worker dead-letters each (each letter at most DEAD_LETTER_BYTES),
    its inbox drains to nothing pending, no "sender" gets a key, and it serves 8 MiB both
    ways after."""
    w = spawn_worker("w", *FUNCS, extra_args=FAST)
    client = await make_agent("client")
    w_inbox, dead = inbox(namespace, "w"), dead_letters(namespace, "w")
    port = free_port()
    with draining(w):
        async with redis_client.pipeline(transaction=False) as pipe:
            for i in range(200):
                ref = reference(elsewhere("127.0.0.1", port)) if i % 2 else os.urandom(64)
                pipe.xadd(w_inbox, forged_call(ref))
            await pipe.execute()

        async def all_dead_lettered() -> bool:
            return int(await redis_client.xlen(dead)) >= 200

        # 0.75 s alone; the bound is for a host busy with other work (over 5 s once, in the
        # whole suite beside other sessions' suites on this 2-core host).
        await eventually(all_dead_lettered, "200 forged calls dead-lettered", within=20)
        await echo_ok(client, "w", 10)

        async def drained() -> bool:
            pending = int((await redis_client.xpending(w_inbox, "asyncgrad"))["pending"])
            return pending == 0 and int(await redis_client.xlen(w_inbox)) == 0

        await eventually(drained, "the worker's inbox empty")
        assert int(await redis_client.memory_usage(dead)) < 200 * 2 * DEAD_LETTER_BYTES
        assert not await redis_client.exists(inbox(namespace, "ghost"), inbox(namespace, "mallory"))
        assert w.process.poll() is None
