"""The sender's side of direct transfers: frames held until their receiver fetched them.

Each held frame is a sealed memfd snapshot (`memory.snapshot`) under a random token. It
is given out once (`take`) to whoever serves it, who closes it once sent (`sent`) or
gives it back if the connection broke (`restore`: the receiver may still ask by Redis).
A frame nobody can fetch any more is dropped: its message was withdrawn or never stored,
or its receiver is gone (`DataPlane`'s sweep). Serving threads take frames too, hence
the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from asyncgrad.transport.data.memory import Snapshot
from asyncgrad.transport.data.reference import new_token

__all__ = ["Held"]


@dataclass(slots=True)
class _Frame:
    snapshot: Snapshot
    dest: str
    since: float = field(default_factory=time.monotonic)
    entry: bytes = b""  # the stream entry of its message, once Redis stored it


class Held:
    """Frames waiting for their receivers, by token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[bytes, _Frame] = {}
        self._taken: dict[bytes, _Frame] = {}  # given out, being sent
        # Called, from any thread, when the last frame went: a closing agent waits for it.
        self.on_drained: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, dest: str, snapshot: Snapshot) -> bytes:
        token = new_token()
        with self._lock:
            self._frames[token] = _Frame(snapshot, dest)
        return token

    def take(self, token: bytes, dest: str | None = None) -> Snapshot | None:
        """The frame under `token`, once (and only for `dest`, if given); the caller
        closes it, or gives it back (`restore`) if it could not be sent."""
        with self._lock:
            frame = self._frames.get(token)
            if frame is None or (dest is not None and frame.dest != dest):
                return None
            del self._frames[token]
            self._taken[token] = frame
            drained = not self._frames
        if drained:
            self.on_drained()
        return frame.snapshot

    def as_file(self, token: bytes, snapshot: Snapshot) -> Snapshot:
        """The taken frame under `token` is `snapshot` from now on (a copy of it as a file,
        for a receiver on this host)."""
        with self._lock:
            frame = self._taken.get(token)
            if frame is not None and frame.snapshot is not snapshot:
                frame.snapshot.close()
                frame.snapshot = snapshot
        return snapshot

    def restore(self, token: bytes) -> None:
        """A frame taken and not sent (the connection broke): fetchable again, by Redis."""
        with self._lock:
            frame = self._taken.pop(token, None)
            if frame is not None:
                self._frames[token] = frame

    def sent(self, token: bytes, recycle: bool = False) -> None:
        """The taken frame is out; `recycle`: its memory may serve the next snapshot
        (nothing refers to it any more)."""
        with self._lock:
            frame = self._taken.pop(token, None)
        if frame is not None:
            frame.snapshot.close(sent=recycle)

    def drop_for(self, dest: str, token: bytes) -> None:
        """Drop a frame its receiver declined (only that receiver may)."""
        if self.take(token, dest) is not None:
            self.sent(token)

    def stored(self, tokens: list[bytes], entry: bytes) -> None:
        with self._lock:
            for token in tokens:
                if (frame := self._frames.get(token)) is not None:
                    frame.entry = entry

    def drop(self, tokens: list[bytes]) -> None:
        for token in tokens:
            if self.take(token) is not None:
                self.sent(token)

    def drop_entry(self, dest: str, entry: bytes) -> int:
        """Drop the frames of a stream entry that will never be read (withdrawn)."""
        with self._lock:
            tokens = [t for t, f in self._frames.items() if f.dest == dest and f.entry == entry]
        self.drop(tokens)
        return len(tokens)

    def waiting(self, older_than: float) -> dict[str, list[bytes]]:
        """The tokens held for longer than `older_than` seconds, by receiver."""
        now = time.monotonic()
        found: dict[str, list[bytes]] = {}
        with self._lock:
            for token, frame in self._frames.items():
                if now - frame.since > older_than:
                    found.setdefault(frame.dest, []).append(token)
        return found

    def close(self) -> None:
        """Drop every frame (those being sent are closed by their senders)."""
        with self._lock:
            frames, self._frames = self._frames, {}
        for frame in frames.values():
            frame.snapshot.close()
