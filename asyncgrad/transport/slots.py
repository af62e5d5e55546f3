"""Redis Cluster's hash slots: the slot of a key, of a command, and where a reply redirects.

A key's slot is CRC16 of the key modulo 16384, or of its `{tag}` if it has a non-empty
one: that is how all of one agent's keys (`NS:{AGENT}:...`) land in one slot.
"""

from __future__ import annotations

import functools

from asyncgrad.transport.resp import Arg, ReplyError

__all__ = ["SLOTS", "Node", "analyse_command", "key_slot", "redirection"]

SLOTS = 16384
Node = tuple[str, int]  # a cluster node: host, port

# Where a command's key is, for the commands whose key is not the first argument;
# None: a command about no key (any node may answer it).
_KEY_INDEX: dict[str, int | None] = {
    "EVAL": 3, "EVALSHA": 3, "EVAL_RO": 3, "EVALSHA_RO": 3, "FCALL": 3, "FCALL_RO": 3,
    "XGROUP": 2, "XINFO": 2, "OBJECT": 2, "MEMORY": 2,
    "PING": None, "ECHO": None, "CLIENT": None, "CLUSTER": None, "INFO": None,
    "SCAN": None, "DBSIZE": None, "TIME": None, "SCRIPT": None, "CONFIG": None,
    "AUTH": None, "HELLO": None, "SELECT": None, "ASKING": None, "READONLY": None,
}  # fmt: skip
_BLOCKING = frozenset(
    {"BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP"}
)


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()  # CRC-16/XMODEM, the cluster's key hash


@functools.lru_cache(maxsize=4096)  # a handful of keys per agent, sent to over and over
def key_slot(key: str | bytes) -> int:
    """The hash slot of `key`: CRC16 of its `{tag}` if it has a non-empty one, else of all of it."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    if (start := data.find(b"{")) != -1 and (end := data.find(b"}", start + 1)) > start + 1:
        data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc % SLOTS


def analyse_command(args: tuple[Arg, ...]) -> tuple[int | None, bool]:
    """The slot of the command's (first) key, None for a keyless one; and whether it may
    block (a read that waits for data holds its connection until it returns)."""
    first = args[0]
    name = (first.decode() if isinstance(first, bytes) else str(first)).upper()
    blocks = name in _BLOCKING
    if name in ("XREAD", "XREADGROUP"):
        upper = [a.upper() if isinstance(a, str) else a for a in args]
        index: int | None = upper.index("STREAMS") + 1
        blocks = "BLOCK" in upper
    else:
        index = _KEY_INDEX.get(name, 1)
        if index == 3 and len(args) > 2 and int(args[2]) == 0:  # EVAL with no keys
            index = None
    if index is None or index >= len(args):
        return None, blocks
    key = args[index]
    return key_slot(key if isinstance(key, str | bytes) else str(key)), blocks


def redirection(error: ReplyError, asked: Node) -> tuple[str, int, Node] | None:
    """`(MOVED or ASK, slot, node)` of a redirection, else None; an empty host in it means
    the node that was asked."""
    code = error.code
    if code not in ("MOVED", "ASK"):
        return None
    _, slot, where = str(error).split(" ", 2)
    host, _, port = where.rpartition(":")
    return code, int(slot), (host or asked[0], int(port))
