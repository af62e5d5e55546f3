"""What processes of this host hold or leave behind, read from /proc (Linux): the data
plane's memfds (`memfd:asyncgrad-frame`), the file a mapped array lies in, listening
sockets (abstract unix ones are listed in /proc/net/unix with a leading `@`), and files
in /dev/shm and /tmp.

Read from outside the processes, as an operator would look: no agent is asked.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

FRAME = "/memfd:asyncgrad-frame (deleted)"
_LISTEN_FLAG = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags
_TCP_LISTEN = "0A"


def fd_targets(pid: int | str = "self") -> list[str]:
    """Where each open fd of `pid` points (fds closed while listing are skipped)."""
    targets = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):
            targets.append(os.readlink(fd_dir / fd))
    return targets


def memfds(pid: int | str = "self", name: str = FRAME) -> list[int]:
    """The inode of each fd of `pid` that is a memfd named `name` (the data plane's, by
    default), sorted: a file open twice shows twice."""
    inodes = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(fd_dir / fd) == name:
                inodes.append(os.stat(fd_dir / fd).st_ino)
    return sorted(inodes)


def mapped_memfds(pid: int | str = "self", name: str = FRAME) -> set[int]:
    """The inodes of the memfds named `name` that `pid` maps."""
    inodes = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == name:
            inodes.add(int(fields[4]))
    return inodes


def mapping_of(address: int, pid: int | str = "self") -> tuple[str, int]:
    """(path, inode) of the mapping of `pid` that holds `address`."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return (fields[5] if len(fields) == 6 else "", int(fields[4]))
    raise LookupError(f"{address:#x} is not mapped in process {pid}")


@dataclass(frozen=True)
class Listening:
    """Listening sockets: abstract unix names (with their `@`) and TCP (host, port)s."""

    unix: frozenset[str]
    tcp: frozenset[tuple[str, int]]

    def __and__(self, other: Listening) -> Listening:
        return Listening(self.unix & other.unix, self.tcp & other.tcp)

    def __bool__(self) -> bool:
        return bool(self.unix or self.tcp)


def listening(pid: int | None = None) -> Listening:
    """The listening sockets of process `pid`, or of this network namespace (None)."""
    inodes = None
    if pid is not None:
        inodes = {t[len("socket:[") : -1] for t in fd_targets(pid) if t.startswith("socket:[")}
    unix = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or not int(fields[3], 16) & _LISTEN_FLAG:
            continue
        if inodes is None or fields[6] in inodes:
            unix.add(fields[7])
    tcp = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != _TCP_LISTEN or (inodes is not None and fields[9] not in inodes):
                    continue
                host, port = fields[1].split(":")
                tcp.add((_host(host), int(port, 16)))
    return Listening(frozenset(unix), frozenset(tcp))


def _host(hexed: str) -> str:
    """/proc/net/tcp's address: an IPv4 one dotted (it is little-endian hex there)."""
    if len(hexed) != 8:
        return hexed
    return ".".join(str(b) for b in bytes.fromhex(hexed)[::-1])


def data_sockets(pid: int) -> Listening:
    """The data plane's listening sockets of process `pid`: its local socket (abstract,
    `@asyncgrad-data-...`) and its TCP data port (whatever else it listens on aside)."""
    found = listening(pid)
    unix = frozenset(n for n in found.unix if n.startswith("@asyncgrad-data-"))
    return Listening(unix, found.tcp)


def named_files() -> set[str]:
    """What the data plane could have left in the file system: shared memory by name
    (entries of /dev/shm that say asyncgrad), and entries of /tmp named as its memfds and
    sockets are (`asyncgrad-frame`, `asyncgrad-data-`). Not all of /tmp's `asyncgrad-*`:
    the test Redis servers of this and of other sessions on this host come and go."""
    found = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/dev/shm"):
            if "asyncgrad" in name.lower():
                found.add(f"/dev/shm/{name}")
    for name in os.listdir("/tmp"):
        if name.startswith(("asyncgrad-frame", "asyncgrad-data")):
            found.add(f"/tmp/{name}")
    return found
