"""Reference counting for RRefs: the owner's table of values and holders, and one agent's
side of the protocol, as a holder and as an owner.

Counting: the owner keeps, per value, a count per holder. Every RRef object anywhere is
one count, under its own agent's name. Whoever puts an RRef in a message adds a count for
the receiver *before* the message leaves: the owner directly, anyone else by an update
to the owner that Redis has stored first (so the receiver's later release can never
overtake it); a message that never leaves (it did not encode, its sender was cancelled,
an owner could not be told) takes its counts back. An RRef object released
(garbage-collected) takes its count away. The owner frees a value when its counts sum to
zero, and drops the counts of a holder only on evidence of its death: it left (a
goodbye), a new incarnation took its name, or it stayed unreachable for longer than the
owner's `rref_lease`. A holder that is merely suspected (a pause, a Redis stall) keeps
its counts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from asyncgrad.errors import CodecError, RRefReleased, TransportError, WorkerUnavailable
from asyncgrad.messages import Header, Leaving, RRefUpdates
from asyncgrad.rpc.lifecycle import Lifecycle
from asyncgrad.rpc.liveness import Liveness
from asyncgrad.rpc.wire import Wire
from asyncgrad.transport import Inbound, InboxMissing

__all__ = ["Passed", "RRefTable", "References"]

logger = logging.getLogger(__name__)

Passed = list[tuple[str, int, str]]  # (owner, id, receiver) of the RRefs in one message
_RELEASED = 10_000  # values released on evidence of death, remembered to say so


class RRefTable:
    """The values this agent owns, and how many references each holder has to each."""

    def __init__(self, owner: str, clock: Callable[[], float | None] = lambda: None) -> None:
        self.owner = owner
        self._clock = clock  # Redis's clock, in ms
        self._values: dict[int, Any] = {}
        self._counts: dict[int, Counter[str]] = {}
        # When each holder got its first count, on Redis's clock: an incarnation of it born
        # later holds none of them (they were the one before's).
        self._since: dict[str, float] = {}
        # Holders dropped on evidence of death (a lease ran out, a new incarnation), per
        # value: whatever they still send about it is ignored.
        self._dropped: dict[int, set[str]] = {}
        # Values freed so, with why and when: asking for one raises `RRefReleased`.
        self._released: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        # Random start: RRefs to an earlier run of this owner (killed and restarted under
        # the same name) must not name, count or free the values of this one.
        self._first = self._next = secrets.randbits(40) << 16

    def own(self, value: Any) -> int:
        rref_id, self._next = self._next, self._next + 1
        self._values[rref_id] = value
        self._counts[rref_id] = Counter()
        return rref_id

    def get(self, rref_id: int) -> Any:
        try:
            return self._values[rref_id]
        except KeyError:
            pass
        released = self._released.get(rref_id)
        if released is not None:
            why, when = released
            raise RRefReleased(
                f"value {rref_id} owned by {self.owner} was released: {why}; that was "
                f"{time.monotonic() - when:.0f} s ago"
            )
        why = (
            "it was freed"
            if self._first <= rref_id < self._next
            else f"the RRef is older than this run of {self.owner} (it restarted?)"
        )
        raise LookupError(f"no value {rref_id} owned by {self.owner}: {why}")

    def add(self, rref_id: int, holder: str, delta: int) -> None:
        counts = self._counts.get(rref_id)
        if counts is None or holder in self._dropped.get(rref_id, ()):
            logger.debug("event=rref_update_ignored owner=%s rref=%d", self.owner, rref_id)
            return
        if holder not in self._since and holder != self.owner and delta > 0:
            self._since[holder] = self._clock() or 0.0
        counts[holder] += delta
        if counts[holder] == 0:
            del counts[holder]
        if sum(counts.values()) <= 0:
            self._free(rref_id)

    def drop_holder(self, holder: str, released: str = "") -> int:
        """Forget every reference `holder` had; how many values that freed. `released`
        says why, when it is evidence of the holder's death rather than its goodbye:
        its later count changes are then ignored, and a value freed so answers with
        `RRefReleased` and that reason."""
        freed = 0
        self._since.pop(holder, None)
        for rref_id in [i for i, c in self._counts.items() if holder in c]:
            counts = self._counts[rref_id]
            del counts[holder]
            if released:
                self._dropped.setdefault(rref_id, set()).add(holder)
            if sum(counts.values()) <= 0:
                self._free(rref_id)
                freed += 1
                if released:
                    self._released[rref_id] = (released, time.monotonic())
                    if len(self._released) > _RELEASED:
                        self._released.popitem(last=False)
        return freed

    def holders(self) -> set[str]:
        """Other agents holding references to values owned here."""
        held = {h for c in self._counts.values() for h in c if h != self.owner}
        for gone in set(self._since) - held:
            del self._since[gone]
        return held

    def holder_since(self, holder: str) -> float | None:
        """When (Redis's clock, ms) `holder` got its first count still held, if it holds any."""
        return self._since.get(holder)

    def _free(self, rref_id: int) -> None:
        del self._values[rref_id], self._counts[rref_id]
        self._dropped.pop(rref_id, None)

    def __len__(self) -> int:
        return len(self._values)


class References:
    """What one agent does to keep the counts right, as a holder and as an owner.

    `owned` is its table of the values it owns.
    """

    def __init__(
        self, wire: Wire, owned: RRefTable, liveness: Liveness, lifecycle: Lifecycle
    ) -> None:
        self.name = wire.name
        self.owned = owned
        self._wire = wire
        self._liveness = liveness
        self._lifecycle = lifecycle
        # RRef objects alive here, per owner elsewhere: whom to tell when this agent leaves.
        self._held_from: collections.Counter[str] = collections.Counter()
        self._releases: dict[str, list[tuple[int, str, int]]] = {}

    # *** RRef objects here ***

    def bind(self, owner: str, rref_id: int, counted: bool) -> None:
        """A new RRef object here: one more count (unless its sender `counted` it already)."""
        if owner != self.name:
            self._held_from[owner] += 1
        elif not counted:
            self.owned.add(rref_id, owner, +1)

    def release(self, owner: str, rref_id: int) -> None:
        """An RRef object died (maybe in another thread, maybe at interpreter exit)."""
        loop = self._lifecycle.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._queue_release, owner, rref_id)
        except RuntimeError:  # the loop closed between the check and the call: nothing to free
            return

    def _queue_release(self, owner: str, rref_id: int) -> None:
        if owner == self.name:
            self.owned.add(rref_id, self.name, -1)
            return
        self._held_from[owner] -= 1
        if not self._lifecycle.running:
            return
        queued = self._releases.setdefault(owner, [])
        queued.append((rref_id, self.name, -1))
        if len(queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush_releases, owner)

    def _flush_releases(self, owner: str) -> None:
        updates = self._releases.pop(owner, [])
        if updates and self._lifecycle.running:
            self._wire.post(owner, RRefUpdates(tuple(updates)))

    # *** passing RRefs on ***

    def take_passed(self, rrefs: list[tuple[str, int]], receiver: str) -> Passed:
        """The RRefs of a message just encoded for `receiver`, taken before any other
        message is: those owned here are counted for the receiver at once, while the local
        reference that may be the last one is still alive."""
        passed = [(owner, rref_id, receiver) for owner, rref_id in rrefs]
        for owner, rref_id, holder in passed:
            if owner == self.name:
                self.owned.add(rref_id, holder, +1)
                if holder != self.name:
                    self._liveness.wanted.set()  # so a holder that dies unannounced is noticed
        return passed

    async def announce_forks(self, passed: Passed) -> None:
        """Tell the owners of the RRefs passed on, and wait until Redis has stored it (so
        the receiver's release can never overtake it). If an owner cannot be told, or the
        caller is cancelled meanwhile, the message must not leave: every count added for
        it is taken back."""
        forks = [(owner, i, holder) for owner, i, holder in passed if owner != self.name]
        if not forks:
            return
        stored = [
            self._wire.send(owner, RRefUpdates(((i, holder, +1),))) for owner, i, holder in forks
        ]
        try:
            errors = await asyncio.gather(*stored, return_exceptions=True)
            failed = next((e for e in errors if isinstance(e, BaseException)), None)
            if isinstance(failed, InboxMissing):
                raise WorkerUnavailable(f"an RRef passed on is owned by a gone worker: {failed}")
            if failed is not None:
                raise failed
        except (Exception, asyncio.CancelledError):
            self._take_back(passed)
            raise

    def _take_back(self, passed: Passed) -> None:
        """Undo the counts of a message that will not be sent. Each -1 to an owner is
        sent after its +1, in order, so it cannot overtake it (and one whose +1 failed
        fails the same way)."""
        for owner, rref_id, holder in passed:
            if owner == self.name:
                self.owned.add(rref_id, holder, -1)
                continue
            try:
                self._wire.post(owner, RRefUpdates(((rref_id, holder, -1),)))
            except TransportError as e:  # Redis is gone: the count stays until holder leaves
                logger.warning("event=take_back_failed owner=%s error=%s", owner, e)

    # *** as an owner ***

    def on_updates(self, header: Header, message: Inbound) -> None:
        """Count changes for RRefs owned here, from their holders."""
        try:
            updates = RRefUpdates.from_wire(self._wire.decode(message)[0])
        except CodecError as e:
            self._wire.dead_letter(message, f"bad rref updates: {e}")
            return
        for rref_id, holder, delta in updates.updates:
            self.owned.add(rref_id, holder, delta)
        self._wire.done(message)
        if self.owned.holders():
            self._liveness.wanted.set()

    def on_leaving(self, header: Header, message: Inbound) -> None:
        """A holder says goodbye: its counts go."""
        freed = self.owned.drop_holder(header.sender)
        self._liveness.forget(header.sender)
        logger.debug(
            "event=holder_left agent=%s holder=%s freed=%d", self.name, header.sender, freed
        )
        self._wire.done(message)

    # *** leaving ***

    def announce_leaving(self) -> None:
        """Tell every owner this agent holds RRefs from that it leaves (they drop its counts)."""
        # Releases still queued need not go: leaving drops all of this agent's counts.
        owners = {o for o, n in self._held_from.items() if n > 0} | set(self._releases)
        self._releases.clear()
        for owner in sorted(owners - {self.name}):
            try:
                self._wire.post(owner, Leaving())
            except TransportError as e:  # Redis is gone: the owner's liveness check frees them
                logger.warning("event=leave_notice_failed owner=%s error=%s", owner, e)
