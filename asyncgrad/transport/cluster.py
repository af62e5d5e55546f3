"""Redis Cluster: every command goes to the master serving its key's hash slot.

`ClusterConnection` has the interface of `resp.Connection` (`command`, `execute`,
`flush`, `held`, `is_open`, `close`, `closed`, `on_lost`), so the transport uses either
without knowing which; `connect` opens the one an address asks for. Over a cluster:

- the slot map comes from `CLUSTER SLOTS`, asked of the URL's seed nodes in turn;
- each master gets one pipelined `resp.Connection`, opened on first use; what is sent
  to it meanwhile waits, in order, and leaves once it is open;
- `MOVED`: the slot lives elsewhere now. That slot is remapped at once, the command is
  sent there, and that node is asked for the whole map (a resharding moves many slots).
  `ASK`: this one command goes to the importing node, after `ASKING`. `TRYAGAIN` and
  `CLUSTERDOWN` (a migration or a failover under way): sent again after a pause. Each
  command follows at most `_MAX_REDIRECTS` of these, then its waiter gets the error;
- a node connection that drops takes the whole `ClusterConnection` down with it: the
  waiters of every node get `ConnectionLost` and `on_lost` is called once, so the
  transport reconnects (and resends, and re-reads its pending entries) just as for a
  single Redis, starting from a fresh slot map: that is how a failover is followed;
- a blocking read (`XREADGROUP ... BLOCK`, `BLPOP`) holds its node's connection until
  it returns. The agent's reader sends its next read only after the writes it carried
  for a batch (`Writer.via`), so those never wait behind one; but a redirection may send
  one of them to the reader's own node afterwards: such a command goes through `spill`
  (the agent's writer) instead of waiting up to the read's `BLOCK` time.

`SyncClusterConnection` is the blocking counterpart for the heartbeat's thread, which
sends one key's commands only: it keeps one connection, and moves it where `MOVED` says.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from asyncgrad.transport.resp import (
    Arg,
    Connection,
    ConnectionLost,
    RedisAddress,
    ReplyError,
    SyncConnection,
    Waiter,
)
from asyncgrad.transport.slots import SLOTS, Node, analyse_command, key_slot, redirection

__all__ = [
    "ClusterConnection",
    "RedisLink",
    "SyncClusterConnection",
    "SyncRedisLink",
    "connect",
    "connect_sync",
]

logger = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_RETRY_DELAY = 0.1  # after TRYAGAIN or CLUSTERDOWN: a slot migrating, a failover


class ClusterConnection:
    """A `resp.Connection` look-alike over a Redis Cluster's masters; see the module doc."""

    def __init__(
        self,
        address: RedisAddress,
        name: str | None = None,
        connect_timeout: float = 10.0,
        on_lost: Callable[[ClusterConnection], None] | None = None,
        spill: Callable[[], RedisLink | None] | None = None,
    ) -> None:
        self.address = address
        self.name = name
        self.on_lost = on_lost
        self.closed = asyncio.Event()
        self._connect_timeout = connect_timeout
        self._slots: list[Node | None] = [None] * SLOTS
        self._conns: dict[Node, Connection] = {}
        self._queued: dict[Node, list[tuple[tuple[Arg, ...], Waiter]]] = {}
        self._opening: dict[Node, asyncio.Task[None]] = {}
        self._refreshing = False
        self._blocked: dict[Node, int] = {}  # blocking commands in flight, per node
        self._spill = spill
        self._held = False
        self._closing = False
        self._lost: ConnectionLost | None = None

    @classmethod
    async def open(
        cls,
        address: RedisAddress,
        *,
        name: str | None = None,
        connect_timeout: float = 10.0,
        on_lost: Callable[[ClusterConnection], None] | None = None,
        spill: Callable[[], RedisLink | None] | None = None,
    ) -> ClusterConnection:
        """Load the slot map from the first seed that answers; `ConnectionLost` if none does.

        `spill` gives another connection, for commands that would otherwise wait behind a
        blocking read of this one (see `_route`).
        """
        cluster = cls(address, name, connect_timeout, spill=spill)
        errors: list[str] = []
        opened = False
        try:
            async with asyncio.timeout(connect_timeout):
                for seed in address.seeds:
                    try:
                        await cluster._load_from(seed)
                    except ConnectionLost as e:
                        errors.append(str(e))
                        continue
                    cluster.on_lost, opened = on_lost, True
                    return cluster
        except TimeoutError:
            errors.append(f"no answer within {connect_timeout} s")
        finally:
            if not opened:  # failed, or cancelled
                cluster.close()
        raise ConnectionLost(f"no node of the Redis Cluster at {address} answered: {errors}")

    async def _load_from(self, seed: Node) -> None:
        """The slot map, as `seed` sees it; its connection is kept if it is a master."""
        conn = await self._connect(seed, on_lost=None)
        try:
            self._load_slots(await conn.execute("CLUSTER", "SLOTS"), seed)
        except ReplyError as e:
            conn.close()
            raise ConnectionLost(
                f"Redis at {seed[0]}:{seed[1]} is not a cluster node ({e}); "
                "use redis:// for a single Redis"
            ) from e
        except BaseException:
            conn.close()
            raise
        if seed not in self._slots:
            # It serves no slot: a replica (a seed demoted by a failover, say). Kept, it
            # would be the first node of `_any_node`, and its close would take this
            # connection down.
            conn.close()
            return
        # Watched from now on; if it died meanwhile, its first command says so.
        conn.on_lost = self._node_lost
        self._conns[seed] = conn

    # *** resp.Connection's interface ***

    @property
    def is_open(self) -> bool:
        """False from the moment `close()` is called or any node's connection is lost."""
        return self._lost is None and not self._closing

    @property
    def held(self) -> bool:
        """While held, commands queue on every node and leave only with `flush()`."""
        return self._held

    @held.setter
    def held(self, held: bool) -> None:
        self._held = held
        for conn in self._conns.values():
            conn.held = held

    def command(self, *args: Arg, waiter: Waiter = None) -> None:
        """Queue a command for the master of its key's slot; its reply goes to `waiter`."""
        if not self.is_open:
            _deliver(waiter, self._gone())
            return
        self._route(args, waiter, None, 0)

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """Queue a command and return the future of its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.command(*args, waiter=future)
        return future

    def flush(self) -> None:
        """Write what is queued for every node now."""
        for conn in self._conns.values():
            conn.flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._shut(ConnectionLost(f"cluster connection {self.name or ''} closed"))

    def node_of(self, key: str) -> Node | None:
        """The master this connection believes serves `key`'s slot."""
        return self._slots[key_slot(key)]

    # *** routing ***

    def _route(
        self,
        args: tuple[Arg, ...],
        waiter: Waiter,
        node: Node | None,
        redirects: int,
        asking: bool = False,
    ) -> None:
        """Send `args` to `node` (None: the master of its slot); `waiter` gets the reply once
        redirections are followed."""
        slot, blocks = analyse_command(args)
        if node is None:
            node = (self._slots[slot] if slot is not None else None) or self._any_node()
        if self._blocked.get(node) and not blocks and (other := self._spill_to()) is not None:
            # It would wait behind a blocking read on that node's connection: the writer's
            # reply redirected to the reader's own node. The other connection routes it
            # afresh (and follows an ASK again itself).
            other.command(*args, waiter=waiter)
            return
        if blocks:
            self._blocked[node] = self._blocked.get(node, 0) + 1
        if asking:  # ASKING must come right before the command, on the same connection
            self._send(node, ("ASKING",), None)
        self._send(node, args, self._follower(args, waiter, node, redirects, blocks))

    def _spill_to(self) -> RedisLink | None:
        other = self._spill() if self._spill is not None else None
        return other if other is not None and other is not self and other.is_open else None

    def _send(self, node: Node, args: tuple[Arg, ...], waiter: Waiter) -> None:
        conn = self._conns.get(node)
        if conn is not None:
            if conn.is_open:
                conn.command(*args, waiter=waiter)
            else:  # lost, and its connection_lost has not run yet
                self._lose(ConnectionLost(f"connection to Redis at {node[0]}:{node[1]} lost"))
                _deliver(waiter, self._gone())
            return
        if not self.is_open:
            _deliver(waiter, self._gone())
            return
        self._queued.setdefault(node, []).append((args, waiter))
        if node not in self._opening:
            task = asyncio.get_running_loop().create_task(self._open_node(node))
            self._opening[node] = task
            task.add_done_callback(self._opened)

    def _follower(
        self, args: tuple[Arg, ...], waiter: Waiter, node: Node, redirects: int, blocks: bool
    ) -> Callable[[Any], None]:
        """The waiter given to a node: it follows redirections, then answers `waiter`."""

        def on_reply(reply: Any) -> None:
            if blocks and (left := self._blocked.get(node, 0) - 1) >= 0:
                self._blocked[node] = left
            if isinstance(reply, ReplyError) and redirects < _MAX_REDIRECTS and self.is_open:
                if (redirect := redirection(reply, node)) is not None:
                    code, slot, target = redirect
                    if code == "MOVED":
                        self._slots[slot] = target
                        self._route(args, waiter, target, redirects + 1)
                        self._refresh(target)
                    else:  # ASK: for this command only
                        self._route(args, waiter, target, redirects + 1, asking=True)
                    return
                if reply.code in ("TRYAGAIN", "CLUSTERDOWN"):
                    # A timer, not a wait for an event: the cluster announces nothing.
                    asyncio.get_running_loop().call_later(
                        _RETRY_DELAY, self._retry, args, waiter, redirects + 1
                    )
                    return
            elif isinstance(reply, ConnectionLost):
                self._lose(reply)
            _deliver(waiter, reply)

        return on_reply

    def _retry(self, args: tuple[Arg, ...], waiter: Waiter, redirects: int) -> None:
        if self.is_open:
            self._route(args, waiter, None, redirects)
        else:
            _deliver(waiter, self._gone())

    def _refresh(self, node: Node) -> None:
        """Ask `node` for the whole slot map (one request at a time)."""
        if self._refreshing:
            return
        self._refreshing = True

        def on_slots(reply: Any) -> None:
            self._refreshing = False
            if isinstance(reply, list):
                self._load_slots(reply, node)
                logger.info("event=slot_map_refreshed connection=%s node=%s:%d", self.name, *node)

        self._send(node, ("CLUSTER", "SLOTS"), on_slots)

    def _load_slots(self, reply: list[Any], asked: Node) -> None:
        slots: list[Node | None] = [None] * SLOTS
        for start, end, master, *_ in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            node = (host if host not in ("", "?") else asked[0], int(master[1]))
            slots[int(start) : int(end) + 1] = itertools.repeat(node, int(end) - int(start) + 1)
        self._slots = slots

    def _any_node(self) -> Node:
        """A node for a keyless command (or a slot nobody serves: it answers CLUSTERDOWN)."""
        if (node := next(iter(self._conns), None)) is not None:
            return node
        return next((n for n in self._slots if n is not None), self.address.seeds[0])

    # *** node connections ***

    async def _connect(
        self, node: Node, on_lost: Callable[[Connection], None] | None
    ) -> Connection:
        return await Connection.open(
            replace(self.address, host=node[0], port=node[1], seeds=()),
            name=self.name,
            connect_timeout=self._connect_timeout,
            on_lost=on_lost,
        )

    async def _open_node(self, node: Node) -> None:
        conn = await self._connect(node, self._node_lost)
        if not self.is_open:
            conn.close()
            return
        self._conns[node] = conn
        conn.held = self._held
        for args, waiter in self._queued.pop(node, []):
            conn.command(*args, waiter=waiter)

    def _opened(self, task: asyncio.Task[None]) -> None:
        node = next(n for n, t in self._opening.items() if t is task)
        del self._opening[node]
        if not task.cancelled() and (error := task.exception()) is not None:
            if not isinstance(error, ConnectionLost):
                cause = error
                error = ConnectionLost(f"cannot connect to {node[0]}:{node[1]}: {cause!r}")
                error.__cause__ = cause
            self._lose(error)
        self._check_closed()

    def _node_lost(self, conn: Connection) -> None:
        if self.is_open:
            self._lose(ConnectionLost(f"connection {self.name or ''} to a cluster node lost"))
        self._check_closed()

    def _lose(self, error: ConnectionLost) -> None:
        """One node is gone: so is this connection (the transport reconnects)."""
        if not self.is_open:
            return
        self._lost = error
        logger.info("event=cluster_connection_lost connection=%s error=%s", self.name, error)
        self._shut(error)
        if self.on_lost is not None:
            self.on_lost(self)

    def _shut(self, error: ConnectionLost) -> None:
        for task in self._opening.values():
            task.cancel()
        queued, self._queued = self._queued, {}
        for conn in self._conns.values():
            conn.close()  # its waiters get ConnectionLost from connection_lost
        for waiting in queued.values():
            for _, waiter in waiting:
                _deliver(waiter, error)
        self._check_closed()

    def _check_closed(self) -> None:
        if (
            not self.is_open
            and not self._opening
            and all(c.closed.is_set() for c in self._conns.values())
        ):
            self.closed.set()

    def _gone(self) -> ConnectionLost:
        return self._lost or ConnectionLost(f"cluster connection {self.name or ''} is closed")


def _deliver(waiter: Waiter, reply: Any) -> None:
    if isinstance(waiter, asyncio.Future):
        if not waiter.done():
            if isinstance(reply, Exception):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)
    elif waiter is not None:
        waiter(reply)


class SyncClusterConnection:
    """A blocking connection to the master of the one key it is used for (a heartbeat)."""

    def __init__(self, address: RedisAddress, *, name: str | None = None, timeout: float = 5.0):
        self._address, self._name, self._timeout = address, name, timeout
        errors = []
        for seed in address.seeds:
            try:
                self._node, self._conn = seed, self._connect(seed)
                return
            except ConnectionLost as e:
                errors.append(str(e))
        raise ConnectionLost(f"no node of the Redis Cluster at {address} answered: {errors}")

    def _connect(self, node: Node) -> SyncConnection:
        at = replace(self._address, host=node[0], port=node[1], seeds=())
        return SyncConnection(at, name=self._name, timeout=self._timeout)

    def execute(self, *args: Arg) -> Any:
        """Run the command where its key lives, following `MOVED` and `ASK`."""
        asking = False
        for _ in range(_MAX_REDIRECTS):
            try:
                if asking:
                    self._conn.execute("ASKING")
                return self._conn.execute(*args)
            except ReplyError as e:
                if (redirect := redirection(e, self._node)) is None:
                    raise
                code, _, node = redirect
                # Moved for good, or asked for this once: either way this connection goes
                # there (a later MOVED brings it back if the migration is not finished).
                self._conn.close()
                self._node, self._conn = node, self._connect(node)
                asking = code == "ASK"
        raise ConnectionLost(f"more than {_MAX_REDIRECTS} cluster redirections for {args[0]!r}")

    def execute_timed(self, *args: Arg) -> tuple[Any, int | None]:
        """`SyncConnection.execute_timed` on the node this connection is at (a command
        without a key, such as `TIME`)."""
        return self._conn.execute_timed(*args)

    def close(self) -> None:
        self._conn.close()


RedisLink = Connection | ClusterConnection
SyncRedisLink = SyncConnection | SyncClusterConnection


async def connect(
    address: RedisAddress,
    *,
    name: str | None = None,
    connect_timeout: float = 10.0,
    on_lost: Callable[[RedisLink], None] | None = None,
    spill: Callable[[], RedisLink | None] | None = None,
) -> RedisLink:
    """A `ClusterConnection` for a cluster address (`spill`: see its `open`), else a
    `resp.Connection`."""
    if address.seeds:
        return await ClusterConnection.open(
            address, name=name, connect_timeout=connect_timeout, on_lost=on_lost, spill=spill
        )
    return await Connection.open(
        address, name=name, connect_timeout=connect_timeout, on_lost=on_lost
    )


def connect_sync(address: RedisAddress, *, name: str | None = None) -> SyncRedisLink:
    """The blocking counterpart of `connect`."""
    if address.seeds:
        return SyncClusterConnection(address, name=name)
    return SyncConnection(address, name=name)
