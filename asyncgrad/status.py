"""`asyncgrad status`: what Redis knows about a namespace's agents.

A table on a terminal, plain columns when piped, one JSON object with `--json`, and with
`--watch` a view refreshed every `--interval` seconds with each agent's rate of messages.

The open distributed autograd contexts and the messages received are what each live agent
last published in its heartbeat (`contexts=N received=N`), so they are at most one heartbeat
interval old; a rate is the difference between two such beats over the time between them
(Redis's clock, `t=MS`). An agent that stopped cleanly left the registry; one that crashed
stays registered (with its inbox) and is shown as gone, since its last heartbeat (its
`seen` key), for `gone_for` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from asyncgrad import transport
from asyncgrad.transport.cluster import RedisLink, connect
from asyncgrad.transport.resp import RedisAddress, ReplyError

__all__ = [
    "GONE_FOR",
    "RateMeter",
    "Rates",
    "WorkerStatus",
    "collect",
    "elsewhere",
    "render",
    "render_json",
    "watch",
]

GONE_FOR = 300.0  # seconds a crashed agent stays listed as gone (`status --gone-for`)
_COLUMNS = (
    "worker", "id", "alive", "heartbeat age", "backlog", "pending", "dead letters", "contexts",
)  # fmt: skip


@dataclass(frozen=True)
class WorkerStatus:
    """One registered agent, live or gone."""

    name: str
    id: int
    alive: bool
    heartbeat_age_s: float | None
    backlog: int
    pending: int
    dead_letters: int
    contexts: int | None  # open distributed autograd contexts (None: not alive)
    received: int | None = None  # messages read from its inbox so far (None: not alive)
    beat_ms: int | None = None  # Redis's clock at its latest heartbeat (None: not alive)
    gone_for_s: float | None = None  # since its last heartbeat (None: alive, or unknown)
    data: str | None = None  # HOST:PORT of its data port (None: none, or not alive)


# Per agent name: messages received per second, between the last two readings.
Rates = Mapping[str, float]


async def collect(url: str, namespace: str, gone_for: float = GONE_FOR) -> list[WorkerStatus]:
    """Every agent registered in `namespace`, by id, but those gone longer than `gone_for`."""
    conn = await connect(RedisAddress.from_url(url), name="asyncgrad:status")
    try:
        flat, now = await asyncio.gather(
            conn.execute("HGETALL", transport.registry(namespace)), conn.execute("TIME")
        )
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        agents = transport.registered(flat)
        rows = await asyncio.gather(
            *(_one(conn, namespace, n, i, now_ms) for n, i in agents.items())
        )
    finally:
        conn.close()
    return sorted((r for r in rows if r is not None and _shown(r, gone_for)), key=lambda r: r.id)


def _shown(row: WorkerStatus, gone_for: float) -> bool:
    return row.alive or row.gone_for_s is None or row.gone_for_s <= gone_for


async def _one(
    conn: RedisLink, namespace: str, name: str, agent_id: int, now_ms: int
) -> WorkerStatus | None:
    inbox = transport.inbox(namespace, name)
    beat, ttl_ms, backlog, dead, has_inbox, seen = await asyncio.gather(
        conn.execute("GET", transport.heartbeat(namespace, name)),
        conn.execute("PTTL", transport.heartbeat(namespace, name)),
        conn.execute("XLEN", inbox),
        conn.execute("XLEN", transport.dead_letters(namespace, name)),
        conn.execute("PTTL", inbox),  # -2: no such key
        conn.execute("GET", transport.seen(namespace, name)),
    )
    alive = ttl_ms > 0
    if not alive and has_inbox == -2 and seen is None:
        return None  # it left (an older version kept its registry entry)
    pending = 0
    if has_inbox != -2:
        try:
            summary = await conn.execute("XPENDING", inbox, transport.GROUP)
            pending = int(summary[0])
        except ReplyError as e:
            if e.code != "NOGROUP":  # an inbox without its group: nothing pending
                raise
    gone_for = max(0.0, (now_ms - int(seen)) / 1000) if not alive and seen is not None else None
    fields = transport.heartbeat_fields(beat)
    full_ms = int(fields.get("ttl_ms", "0"))
    age = max(0.0, (full_ms - ttl_ms) / 1000) if alive and full_ms else None

    def number(field: str) -> int | None:
        value = fields.get(field, "")
        return int(value) if alive and value.isdigit() else None

    return WorkerStatus(
        name, agent_id, alive, age, int(backlog), pending, int(dead), number("contexts"),
        number("received"), number("t"), gone_for, fields.get("data") if alive else None,
    )  # fmt: skip


def _cells(r: WorkerStatus) -> list[str]:
    if r.alive:
        alive = "yes"
    elif r.gone_for_s is None:
        alive = "no"
    else:
        alive = f"gone {_duration(r.gone_for_s)}"
    age = f"{r.heartbeat_age_s:.1f} s" if r.heartbeat_age_s is not None else "-"
    contexts = str(r.contexts) if r.contexts is not None else "-"
    return [
        r.name, str(r.id), alive, age, str(r.backlog), str(r.pending), str(r.dead_letters),
        contexts,
    ]  # fmt: skip


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(
    rows: list[WorkerStatus],
    namespace: str,
    console: Console | None = None,
    rates: Rates | None = None,
) -> None:
    """A table on a terminal; plain columns otherwise (for grep, awk and logs).

    With `rates`, a `msgs/s` column: messages each agent received per second.
    """
    console = console or Console()
    if console.is_terminal:
        console.print(_table(rows, namespace, rates, console.width))
        return
    _plain(console.file, f"asyncgrad namespace {namespace!r}", _header(rates), _lines(rows, rates))


def _header(rates: Rates | None) -> list[str]:
    return list(_COLUMNS) + (["msgs/s"] if rates is not None else [])


def _lines(rows: list[WorkerStatus], rates: Rates | None) -> list[list[str]]:
    return [_cells(r) + ([_rate(rates, r.name)] if rates is not None else []) for r in rows]


def _table(
    rows: list[WorkerStatus], namespace: str, rates: Rates | None, width: int
) -> RenderableType:
    """A table if it fits in `width` (headers may wrap at spaces), else one paragraph per
    agent: a name is never cut."""
    title = f"asyncgrad namespace {namespace!r}"
    header = _header(rates)
    lines = _lines(rows, rates)
    needs = sum(
        max(max(len(word) for word in h.split()), *(len(c) for c in column)) + 3
        for h, *column in zip(header, *lines, strict=True)
    )
    if needs + 1 > width:
        return Group(
            Text(title, style="italic"),
            *(
                Text(f"{cells[0]} ", style="bold").append(
                    ", ".join(f"{h} {c}" for h, c in zip(header[1:], cells[1:], strict=True)),
                    style="not bold",
                )
                for cells in lines
            ),
        )
    table = Table(title=title)
    for column in header:
        if column == "worker":
            table.add_column(column, no_wrap=True)
        else:
            table.add_column(column, justify="right")
    for line in lines:
        table.add_row(*line)
    return table


def _rate(rates: Rates, name: str) -> str:
    return f"{rates[name]:.1f}" if name in rates else "-"


def _plain(out: IO[str], title: str, header: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(c) for c in column) for column in zip(header, *lines, strict=True)]
    print(title, file=out)
    for cells in (header, *lines):
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip(), file=out)
    out.flush()


async def watch(url: str, namespace: str, interval: float, gone_for: float, as_json: bool) -> None:
    """Collect every `interval` s until cancelled (Ctrl-C): a live table on a terminal, else
    one reading after another (plain, or one JSON object per line)."""
    console = Console()
    meter = RateMeter()
    live = (
        Live(console=console, auto_refresh=False) if console.is_terminal and not as_json else None
    )
    with live or contextlib.nullcontext():
        while True:
            rows = await collect(url, namespace, gone_for)
            rates = meter.update(rows)
            if as_json:
                render_json(rows, namespace, console.file, rates)
            elif live is not None:
                view = _table(rows, namespace, rates, console.width)
                caption = Text(f"every {interval:g} s; Ctrl-C to stop", style="dim")
                live.update(Group(view, caption), refresh=True)
            else:
                render(rows, namespace, console, rates)
                print(file=console.file, flush=True)
            await asyncio.sleep(interval)  # the refresh period, not a wait for an event


class RateMeter:
    """Messages per second each agent received, from successive readings of its counter.

    A rate changes when the agent's heartbeat did (it publishes the counter at each beat),
    so a reading taken between two beats keeps the rate of the last two.
    """

    def __init__(self) -> None:
        self._last: dict[str, WorkerStatus] = {}
        self._rates: dict[str, float] = {}

    def update(self, rows: list[WorkerStatus]) -> dict[str, float]:
        for r in rows:
            b = self._last.get(r.name)
            if r.received is None or r.beat_ms is None:
                self._last.pop(r.name, None)
                self._rates.pop(r.name, None)
                continue
            if b is None or b.beat_ms is None or b.received is None or r.received < b.received:
                self._last[r.name] = r  # first seen, or a new run (its counter began again)
                self._rates.pop(r.name, None)
            elif r.beat_ms > b.beat_ms:
                self._rates[r.name] = (r.received - b.received) / ((r.beat_ms - b.beat_ms) / 1000)
                self._last[r.name] = r
        names = {r.name for r in rows}
        return {n: v for n, v in self._rates.items() if n in names}


async def elsewhere(url: str, namespace: str) -> str:
    """For an empty namespace: the namespaces that do have live agents on that Redis."""
    live = await transport.live_namespaces(RedisAddress.from_url(url))
    if live is None:
        return ""  # this Redis user may not SCAN
    others = [n for n in live if n != namespace]
    if not others:
        return "; no namespace there has a live agent"
    shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
    return f"; namespaces with live agents there: {shown}"


def render_json(
    rows: list[WorkerStatus], namespace: str, out: IO[str], rates: Rates | None = None
) -> None:
    """One JSON object on one line: `{"namespace": ..., "workers": [{"name", "id", ...}]}`."""
    workers: list[dict[str, Any]] = []
    for r in rows:
        worker = dataclasses.asdict(r)
        if rates is not None:
            worker["received_per_s"] = rates.get(r.name)
        workers.append(worker)
    print(json.dumps({"namespace": namespace, "workers": workers}), file=out, flush=True)
