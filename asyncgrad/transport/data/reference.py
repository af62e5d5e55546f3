"""What a stream entry carries instead of a large frame: a `Reference` to it.

The reference says where the frame's sender serves it (its `Endpoints`), how large it
is, and the single-use token that authorises fetching it. It travels inside the Redis
message, so only agents that may read the receiver's inbox ever see the token.

Where the receiver looks for the bytes is decided by what the two agents are, not by
their addresses: a local socket (and the sender's memfd passed over it) only when both
run under one kernel boot (`boot`, random per boot) and in one network namespace (`net`:
an abstract unix socket is visible only there). Agents on different machines never try
to share memory, whatever their addresses; agents in different network namespaces of one
machine (containers, or tests simulating hosts) use TCP like different hosts do.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from functools import cache
from typing import Final

from asyncgrad.errors import MessageError

__all__ = ["TOKEN_BYTES", "Endpoints", "Reference", "RefField", "new_token"]

TOKEN_BYTES: Final = 16
_VERSION: Final = 1
# version, token, size, network namespace, TCP port; then agent, boot id, unix socket name,
# TCP host and certificate fingerprint, each after its length.
_FIXED: Final = struct.Struct(f"<B{TOKEN_BYTES}sQQH")
_TEXT: Final = struct.Struct("<H")


class RefField(bytes):
    """An encoded `Reference`, in a message's frames in place of the frame it stands for
    (the writer stores it as field `r` instead of `f`)."""

    __slots__ = ()


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where an agent serves its frames: `unix` (an abstract socket name, b"" if none),
    `host`/`port` (TCP, port 0 if none) and, with TLS, the fingerprint of its certificate
    (`cert`), which the receiver checks: the control plane vouches for it; and what the
    agent runs under (`boot`, `net`)."""

    agent: str
    boot: str
    net: int
    unix: bytes = b""
    host: str = ""
    port: int = 0
    cert: bytes = b""  # with TLS: the SHA-256 of the certificate the TCP port presents

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def tcp_address(self) -> str:
        """`HOST:PORT` of the TCP port (an IPv6 host in brackets), "" without one."""
        if not self.port:
            return ""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def here(cls, agent: str, unix: bytes, host: str, port: int, cert: bytes) -> Endpoints:
        boot, net = _kernel()
        return cls(agent, boot, net, unix, host, port, cert)

    def shares_memory_with(self, other: Endpoints) -> bool:
        """Whether `other`'s local socket (and memfds) can be reached from here."""
        return bool(self.unix and other.unix) and (self.boot, self.net) == (other.boot, other.net)


@dataclass(frozen=True, slots=True)
class Reference:
    """A frame of `size` bytes served by `sender`, fetched once with `token`."""

    sender: Endpoints
    token: bytes
    size: int

    def encode(self) -> RefField:
        s = self.sender
        fixed = _FIXED.pack(_VERSION, self.token, self.size, s.net, s.port)
        texts = (s.agent.encode(), s.boot.encode(), s.unix, s.host.encode(), s.cert)
        return RefField(fixed + b"".join(_TEXT.pack(len(t)) + t for t in texts))

    @classmethod
    def decode(cls, data: bytes) -> Reference:
        """`MessageError` unless `data` is a reference `encode` made."""
        try:
            version, token, size, net, port = _FIXED.unpack_from(data)
            texts: list[bytes] = []
            at = _FIXED.size
            for _ in range(5):
                (length,) = _TEXT.unpack_from(data, at)
                at += _TEXT.size
                texts.append(data[at : at + length])
                at += length
                if len(texts[-1]) != length:
                    raise ValueError("truncated")
            agent, boot, host = (texts[0].decode(), texts[1].decode(), texts[3].decode())
        except (struct.error, ValueError) as e:
            raise MessageError(f"malformed data reference: {e}") from e
        if version != _VERSION or at != len(data) or size <= 0 or len(texts[4]) not in (0, 32):
            raise MessageError("malformed data reference")
        return cls(Endpoints(agent, boot, net, texts[2], host, port, texts[4]), token, size)


@cache
def _kernel() -> tuple[str, int]:
    """This kernel boot's id and this process's network namespace."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return boot, os.stat("/proc/self/ns/net").st_ino
