"""`asyncgrad status`: what Redis knows about a namespace's agents, as a table.

The open distributed autograd contexts are what each live agent last published in its
heartbeat (`contexts=N`), so they are at most one heartbeat interval old.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from asyncgrad import transport
from asyncgrad.transport.cluster import RedisLink, connect
from asyncgrad.transport.resp import RedisAddress, ReplyError

__all__ = ["WorkerStatus", "collect", "render"]


@dataclass(frozen=True)
class WorkerStatus:
    """One registered agent, live or not."""

    name: str
    id: int
    alive: bool
    heartbeat_age_s: float | None
    backlog: int
    pending: int
    dead_letters: int
    contexts: int | None  # open distributed autograd contexts (None: not alive)


async def collect(url: str, namespace: str) -> list[WorkerStatus]:
    """Every agent registered in `namespace`, by id."""
    conn = await connect(RedisAddress.from_url(url), name="asyncgrad:status")
    try:
        flat = await conn.execute("HGETALL", transport.registry(namespace))
        agents = {
            k[2:].decode(): int(v)
            for k, v in zip(flat[::2], flat[1::2], strict=True)
            if k.startswith(b"n:")
        }
        rows = await asyncio.gather(*(_one(conn, namespace, n, i) for n, i in agents.items()))
    finally:
        conn.close()
    return sorted(rows, key=lambda r: r.id)


async def _one(conn: RedisLink, namespace: str, name: str, agent_id: int) -> WorkerStatus:
    beat, ttl_ms, backlog, dead = await asyncio.gather(
        conn.execute("GET", transport.heartbeat(namespace, name)),
        conn.execute("PTTL", transport.heartbeat(namespace, name)),
        conn.execute("XLEN", transport.inbox(namespace, name)),
        conn.execute("XLEN", transport.dead_letters(namespace, name)),
    )
    try:
        summary = await conn.execute("XPENDING", transport.inbox(namespace, name), transport.GROUP)
        pending = int(summary[0])
    except ReplyError:  # no inbox (the agent left): nothing pending
        pending = 0
    alive = ttl_ms > 0
    fields = transport.heartbeat_fields(beat)
    full_ms = int(fields.get("ttl_ms", "0"))
    age = max(0.0, (full_ms - ttl_ms) / 1000) if alive and full_ms else None
    contexts = int(fields["contexts"]) if alive and "contexts" in fields else None
    return WorkerStatus(name, agent_id, alive, age, int(backlog), pending, int(dead), contexts)


def render(rows: list[WorkerStatus], namespace: str, console: Console | None = None) -> None:
    table = Table(title=f"asyncgrad namespace {namespace!r}")
    columns = ("worker", "id", "alive", "heartbeat age", "backlog", "pending", "dead letters")
    for column in (*columns, "contexts"):
        table.add_column(column, justify="left" if column == "worker" else "right")
    for r in rows:
        age = f"{r.heartbeat_age_s:.1f} s" if r.heartbeat_age_s is not None else "-"
        contexts = str(r.contexts) if r.contexts is not None else "-"
        table.add_row(
            r.name, str(r.id), "yes" if r.alive else "no", age,
            str(r.backlog), str(r.pending), str(r.dead_letters), contexts,
        )  # fmt: skip
    (console or Console()).print(table)
