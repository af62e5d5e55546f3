"""The bytes on a data connection, both ways, and the limits that keep it cheap.

A receiver asks `MAGIC + token` (20 bytes); the sender answers a 24-byte header,
`MAGIC, status, how, offset, length`: `FOUND` with `FD` (on a local socket: the frame's
sealed memfd rides along as SCM_RIGHTS, the frame is `length` bytes at `offset` of it)
or `BYTES` (the `length` bytes follow), else `UNKNOWN` (no such token, or used: a token
is good once) and nothing more. A connection may carry one request after another.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

from asyncgrad.transport.data.reference import TOKEN_BYTES

__all__ = [
    "BYTES",
    "FD",
    "FOUND",
    "HEADER",
    "MAGIC",
    "REQUEST_BYTES",
    "UNKNOWN",
    "recv_exact",
]

MAGIC: Final = b"AGD1"
REQUEST_BYTES: Final = len(MAGIC) + TOKEN_BYTES
HEADER: Final = struct.Struct("<4sBB2xQQ")
FOUND, UNKNOWN = 0, 1
FD, BYTES = 0, 1


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
