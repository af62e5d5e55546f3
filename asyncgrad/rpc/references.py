"""An agent's side of reference counting (the protocol is drawn in rref.py): RRefs to and
from the wire, the counts for RRefs a message passes on, releases, and leaving.

The values an agent owns, with their counts, are in its `RRefTable` (`agent._rrefs`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from asyncgrad.errors import CodecError, TransportError, WorkerUnavailable
from asyncgrad.rpc.messages import Header, Kind, MessageError, RRefUpdates
from asyncgrad.rpc.rref import RRef
from asyncgrad.transport import Inbound, InboxMissing

if TYPE_CHECKING:
    from asyncgrad.rpc.agent import Agent

__all__ = ["Passed", "References"]

logger = logging.getLogger(__name__)

Passed = list[tuple[str, int, str]]  # (owner, id, receiver) of the RRefs in one message


class References:
    """What one agent does to keep the counts right, as a holder and as an owner."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        # RRef objects alive here, per owner elsewhere: whom to tell when this agent leaves.
        self.held_from: collections.Counter[str] = collections.Counter()
        self._releases: dict[str, list[tuple[int, str, int]]] = {}
        # Of the message being encoded (encoding is synchronous).
        self._receiver = ""
        self._passing: Passed = []

    # *** on the wire ***

    def encoding_to(self, receiver: str) -> None:
        """A message to `receiver` is about to be encoded. It starts with no RRefs passed:
        those of a message that failed to encode (and so is never sent) are never counted."""
        self._receiver, self._passing = receiver, []

    def to_wire(self, rref: RRef[Any]) -> tuple[str, int]:
        """An RRef in a message: `(owner, id)`."""
        # Counted by `take_passed` once the whole message has encoded.
        self._passing.append((rref.owner, rref.id, self._receiver))
        return (rref.owner, rref.id)

    def from_wire(self, wire: Any) -> RRef[Any]:
        """An RRef that arrived: its count was added by the sender."""
        if not (isinstance(wire, tuple) and len(wire) == 2 and isinstance(wire[0], str)):
            raise MessageError("an rref is (owner, id)")
        return RRef._held(self._agent, wire[0], wire[1])

    def drop_passed(self) -> bool:
        """Forget the RRefs of the message just encoded (it will not be sent); any?"""
        passed, self._passing = self._passing, []
        return bool(passed)

    # *** passing RRefs on ***

    def take_passed(self) -> Passed:
        """The RRefs of the message just encoded, taken before any other message is:
        those owned here are counted for the receiver at once, while the local reference
        that may be the last one is still alive."""
        agent = self._agent
        passed, self._passing = self._passing, []
        for owner, rref_id, holder in passed:
            if owner == agent.name:
                agent._rrefs.add(rref_id, holder, +1)
                if holder != agent.name:
                    agent._liveness.wanted.set()  # so a holder that dies unannounced is noticed
        return passed

    async def announce_forks(self, passed: Passed) -> None:
        """Tell the owners of the RRefs passed on, and wait until Redis has stored it (so
        the receiver's release can never overtake it). If an owner cannot be told, or the
        caller is cancelled meanwhile, the message must not leave: every count added for
        it is taken back."""
        forks = [(owner, i, holder) for owner, i, holder in passed if owner != self._agent.name]
        if not forks:
            return
        stored = [self._send_updates(owner, [(i, holder, +1)]) for owner, i, holder in forks]
        try:
            errors = await asyncio.gather(*stored, return_exceptions=True)
            failed = next((e for e in errors if e is not None), None)
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
        agent = self._agent
        for owner, rref_id, holder in passed:
            if owner == agent.name:
                agent._rrefs.add(rref_id, holder, -1)
                continue
            try:
                self._post_updates(owner, [(rref_id, holder, -1)])
            except TransportError as e:  # Redis is gone: the count stays until holder leaves
                logger.warning("event=take_back_failed owner=%s error=%s", owner, e)

    def _send_updates(
        self, owner: str, updates: list[tuple[int, str, int]]
    ) -> asyncio.Future[None]:
        return self._agent.send(owner, Kind.RREF_UPDATES, RRefUpdates(tuple(updates)).to_wire())

    def _post_updates(self, owner: str, updates: list[tuple[int, str, int]]) -> None:
        self._agent.post(owner, Kind.RREF_UPDATES, RRefUpdates(tuple(updates)).to_wire())

    def on_updates(self, header: Header, message: Inbound) -> None:
        """Count changes for RRefs owned here, from their holders."""
        agent = self._agent
        try:
            updates = RRefUpdates.from_wire(agent._decode(message)[0])
        except CodecError as e:
            agent._transport.dead_letter(message, f"bad rref updates: {e}")
            return
        for rref_id, holder, delta in updates.updates:
            agent._rrefs.add(rref_id, holder, delta)
        agent._transport.done(message)
        if agent._rrefs.holders():
            agent._liveness.wanted.set()

    # *** releasing and leaving ***

    def release(self, owner: str, rref_id: int) -> None:
        """An RRef object died (maybe in another thread, maybe at interpreter exit)."""
        loop = self._agent._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._queue_release, owner, rref_id)
        except RuntimeError:  # the loop closed between the check and the call: nothing to free
            return

    def _queue_release(self, owner: str, rref_id: int) -> None:
        agent = self._agent
        if owner == agent.name:
            agent._rrefs.add(rref_id, agent.name, -1)
            return
        self.held_from[owner] -= 1
        if not agent._running():
            return
        queued = self._releases.setdefault(owner, [])
        queued.append((rref_id, agent.name, -1))
        if len(queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush_releases, owner)

    def _flush_releases(self, owner: str) -> None:
        updates = self._releases.pop(owner, [])
        if updates and self._agent._running():
            self._post_updates(owner, updates)

    def announce_leaving(self) -> None:
        """Tell every owner this agent holds RRefs from that it leaves (they drop its counts)."""
        # Releases still queued need not go: leaving drops all of this agent's counts.
        owners = {o for o, n in self.held_from.items() if n > 0} | set(self._releases)
        self._releases.clear()
        for owner in sorted(owners - {self._agent.name}):
            try:
                self._agent.post(owner, Kind.LEAVING, {})
            except TransportError as e:  # Redis is gone: the owner's liveness check frees them
                logger.warning("event=leave_notice_failed owner=%s error=%s", owner, e)
