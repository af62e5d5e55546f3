"""The bytes on a data connection, both ways, and the limits that keep it cheap.

A receiver asks `MAGIC + token` (20 bytes); the sender answers a 24-byte header,
`MAGIC, status, how, offset, length`: `FOUND` with `FD` (on a local socket: the frame's
sealed memfd rides along as SCM_RIGHTS, the frame is `length` bytes at `offset` of it)
or `BYTES` (the `length` bytes follow), else `UNKNOWN` (no such token, or used: a token
is good once) and nothing more. A connection may carry one request after another.

On one host a sender may also offer a frame before it is asked (`PUSH`): `PUSH_MAGIC,
token, offset, length` with the memfd, on its own connection to the receiver's local
socket, right when the message leaves; the receiver takes it when the message arrives,
without a round trip, and says so (`ACK_MAGIC + token`), after which the sender stops
holding it. A push is only an offer: the sender holds the frame until that ack, so a push
lost or refused costs nothing but the round trip it would have saved. Local sockets are
SOCK_SEQPACKET: each request, answer, push and ack is one message, never split.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

from asyncgrad.transport.data.reference import TOKEN_BYTES

__all__ = [
    "ACK_MAGIC",
    "BYTES",
    "PUSH",
    "PUSH_MAGIC",
    "FD",
    "FOUND",
    "HEADER",
    "MAGIC",
    "REQUEST_BYTES",
    "UNKNOWN",
    "fds_of",
    "recv_exact",
]

MAGIC: Final = b"AGD1"
REQUEST_BYTES: Final = len(MAGIC) + TOKEN_BYTES
HEADER: Final = struct.Struct("<4sBB2xQQ")
PUSH_MAGIC: Final = b"AGP1"
PUSH: Final = struct.Struct(f"<4s{TOKEN_BYTES}sQQ")
ACK_MAGIC: Final = b"AGA1"
FOUND, UNKNOWN = 0, 1
FD, BYTES = 0, 1


def fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors that came with a message (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += list(memoryview(data[:usable]).cast("i"))
    return fds


def recv_exact(sock: socket.socket, count: int) -> bytes | None:
    """`count` bytes from a blocking socket; None at a clean end before the first byte."""
    chunks: list[bytes] = []
    got = 0
    while got < count:
        chunk = sock.recv(count - got)
        if not chunk:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed after {got} of {count} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
