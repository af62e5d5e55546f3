"""Frames offered by their senders before they were asked for (`protocol.PUSH`), waiting
here for the message that refers to them.

A push is an offer, not a transfer: its sender still holds the frame until it reads the
ack that `claim` sends, so dropping an offer (too many, or unclaimed for long) never
loses a frame: the receiver then asks for it as if it had never been offered.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Final

from asyncgrad.transport.data.protocol import ACK_MAGIC

__all__ = ["MAX_OFFERS", "Offer", "Pushed"]

MAX_OFFERS: Final = 1024  # offers kept at once; more are refused (closed)


@dataclass(slots=True)
class Offer:
    fd: int
    offset: int
    length: int
    conn: socket.socket  # where the ack goes
    since: float = field(default_factory=time.monotonic)


class Pushed:
    """Offers by token (used on the event loop only)."""

    def __init__(self) -> None:
        self._offers: dict[bytes, Offer] = {}

    def __len__(self) -> int:
        return len(self._offers)

    def add(self, token: bytes, offer: Offer) -> None:
        if len(self._offers) >= MAX_OFFERS or token in self._offers:
            os.close(offer.fd)
            return
        self._offers[token] = offer

    def has(self, token: bytes) -> bool:
        return token in self._offers

    def from_connection(self, conn: socket.socket) -> bool:
        return any(offer.conn is conn for offer in self._offers.values())

    def claim(self, token: bytes) -> Offer | None:
        """The offer under `token`, if any (the caller owns its fd); its sender is told."""
        offer = self._offers.pop(token, None)
        if offer is not None:
            # The sender stops holding the frame when it reads this; if it cannot (it is
            # gone, or its socket is full) it drops the frame when this agent is gone.
            with contextlib.suppress(OSError):
                offer.conn.send(ACK_MAGIC + token)
        return offer

    def expire(self, older_than: float) -> int:
        now = time.monotonic()
        old = [t for t, o in self._offers.items() if now - o.since > older_than]
        for token in old:
            os.close(self._offers.pop(token).fd)
        return len(old)

    def close(self) -> None:
        for offer in self._offers.values():
            os.close(offer.fd)
        self._offers.clear()
