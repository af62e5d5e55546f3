"""Hosts simulated on one machine: Linux network namespaces joined by veth links.

Each host is a network namespace of its own: its own loopback, its own address, its own
TCP stack, so traffic between two of them crosses a real (virtual) link instead of a
shared loopback. Needs root and iproute2's `ip`.

    >>> with SimulatedHosts(2) as (here, there), here.redis() as server:  # at here.address
    ...     worker = [*there.prefix, "asyncgrad", "worker", "w1", "--import", "my.functions"]
    ...     subprocess.run(worker, env={**os.environ, "ASYNCGRAD_REDIS_URL": server.url})

Topology. Two hosts: one veth pair, its ends `eth0` in each host, the shortest link (what
`B3x_bandwidth_hosts` measures). More: each host's `eth0` is one end of a veth pair whose
other end is a port of a bridge in a switch namespace of the run's own, so every host
reaches every other on one LAN. Links keep veth's default MTU (1500), as on an ordinary
Ethernet. Nothing is made in the caller's namespace (no interface, address or route), so
the machine's own network is untouched and two runs cannot meet even if they drew the
same /24; each run still draws its own /24 from 198.18.0.0/15 (RFC 2544's benchmarking
range) so that none of their addresses look alike.

Names: `asyncgrad-PID-START-RUN-ROLE`, PID and START (its start time) being the creating
process's, RUN random. Leaving `with` removes the namespaces (their links go with them),
also when the body raised; entering first removes the leftovers of runs whose process is
gone (a SIGKILLed run cannot clean up after itself).

A process on a host: prefix its command with `host.prefix` (`ip netns exec NAME`). The
calling thread itself: `with host.entered():` opens its new sockets there (an asyncio
loop run in that thread included), and the threads and processes it starts start there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from asyncgrad.embedded import EmbeddedRedis

__all__ = [
    "HostsUnavailable",
    "SimulatedHost",
    "SimulatedHosts",
    "check_available",
    "remove_leftovers",
]

logger = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")  # where `ip netns add` names namespaces
_PREFIX = "asyncgrad-"
_NAME = re.compile(rf"^{_PREFIX}(\d+)-(\d+)-")
_CLONE_NEWNET = 0x40000000
_IP_TIMEOUT_S = 10.0


class HostsUnavailable(RuntimeError):
    """Simulated hosts cannot be made on this machine; the message says why (a test's
    skip reason, a benchmark's `ok: false` reason)."""


@dataclass(frozen=True)
class SimulatedHost:
    """One simulated host: a network namespace `name`, reachable at `address`."""

    name: str
    address: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """Put before a command to run it on this host."""
        return ("ip", "netns", "exec", self.name)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread on this host: sockets it opens meanwhile, and threads and
        processes it starts, live in this host's network stack (open sockets stay where
        they were opened, threads where they started). Back in its own on exit."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / self.name, os.O_RDONLY)
            try:
                _setns(libc, target, self.name)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(libc, own, "the thread's own network namespace")
        finally:
            os.close(own)

    @contextlib.contextmanager
    def redis(
        self, server: str | None = None, options: tuple[str, ...] = ()
    ) -> Iterator[EmbeddedRedis]:
        """An embedded redis-server on this host, listening on TCP at its address
        (`server`: the binary, see EmbeddedRedis); stopped on exit."""
        with self.entered():  # the port is picked, and PING'd, in this host's stack
            embedded = EmbeddedRedis(server, port=0, host=self.address, options=options).start()
        try:
            yield embedded
        finally:
            embedded.stop()


class SimulatedHosts:
    """`count` simulated hosts on one LAN, removed on exit (see the module docstring).

    Entering returns the hosts, `count` of them; it raises `HostsUnavailable` when this
    machine cannot make network namespaces (not root, no `ip`).
    """

    def __init__(self, count: int = 2) -> None:
        if not 2 <= count <= 250:
            raise ValueError(f"simulated hosts: 2 to 250 of them, not {count}")
        self.count = count
        run = uuid.uuid4().hex[:6]
        self.stem = f"{_PREFIX}{os.getpid()}-{_start_time(os.getpid())}-{run}"
        block = int(run, 16) % 512  # one of the 512 /24s of 198.18.0.0/15
        self.subnet = f"198.{18 + block // 256}.{block % 256}"
        self.hosts = tuple(
            SimulatedHost(f"{self.stem}-h{i}", f"{self.subnet}.{i + 1}") for i in range(count)
        )
        self.switch = f"{self.stem}-sw" if count > 2 else None
        self._made: list[str] = []

    def __enter__(self) -> tuple[SimulatedHost, ...]:
        check_available()
        remove_leftovers()
        try:
            self._make()
        except BaseException:
            self._remove()
            raise
        names = ",".join(h.name for h in self.hosts)
        logger.info("event=hosts_up hosts=%s subnet=%s.0/24", names, self.subnet)
        return self.hosts

    def __exit__(self, *exc_info: object) -> None:
        self._remove()
        logger.info("event=hosts_removed hosts=%s", ",".join(h.name for h in self.hosts))

    def _make(self) -> None:
        names = [h.name for h in self.hosts] + ([self.switch] if self.switch else [])
        try:
            _ip("netns", "add", names[0])
        except RuntimeError as e:  # the first one made tells whether any can be
            raise HostsUnavailable(f"simulated hosts: cannot make a network namespace: {e}") from e
        self._made.append(names[0])
        for name in names[1:]:
            _ip("netns", "add", name)
            self._made.append(name)
        for name in names:
            _ip("-n", name, "link", "set", "lo", "up")
        if self.switch is None:
            a, b = self.hosts
            _veth(a.name, "eth0", b.name)
        else:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                _veth(host.name, f"port{i}", self.switch)
                _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
        for host in self.hosts:
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")

    def _remove(self) -> None:
        """Delete every namespace made, each even if another fails; then raise what failed."""
        failures = []
        while self._made:
            name = self._made.pop()
            try:
                _ip("netns", "delete", name)
            except RuntimeError as e:
                failures.append(str(e))
        if failures:
            raise RuntimeError("simulated hosts not all removed: " + "; ".join(failures))


def check_available() -> None:
    """Raise `HostsUnavailable` when this process cannot make simulated hosts for sure
    (not root, no `ip`); making one can still fail (a container without the capability)."""
    if os.geteuid() != 0:
        raise HostsUnavailable(
            "simulated hosts need root: network namespaces and veth links (ip netns) "
            "are for root only"
        )
    if shutil.which("ip") is None:
        raise HostsUnavailable("simulated hosts need iproute2's `ip` command, not found on PATH")


def remove_leftovers() -> list[str]:
    """Delete the namespaces of runs whose process is gone; their names, in order."""
    if not NETNS_DIR.is_dir():
        return []
    removed = []
    for path in sorted(NETNS_DIR.iterdir()):
        found = _NAME.match(path.name)
        if found is None or _start_time(int(found[1])) == int(found[2]):
            continue  # not ours, or its process still runs
        try:
            _ip("netns", "delete", path.name)
        except RuntimeError:
            if path.exists():
                raise
            continue  # another run, sweeping too, deleted it first
        removed.append(path.name)
    if removed:
        logger.info("event=hosts_leftovers_removed names=%s", ",".join(removed))
    return removed


def _start_time(pid: int) -> int:
    """When process `pid` started (clock ticks after boot), -1 if there is none: a pid
    alone could be taken by a new process after the run that had it died."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # no such process, or it just ended
        return -1
    # The command name in parentheses may contain spaces: count fields after the last ")".
    return int(stat.rpartition(")")[2].split()[19])


def _ip(*args: str) -> None:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        said = done.stderr.strip() or f"exit code {done.returncode}"
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {said}")


def _veth(host: str, peer: str, peer_namespace: str) -> None:
    """A veth pair made in place: `eth0` in namespace `host`, `peer` in `peer_namespace`
    (never in ours, so its names cannot clash with the machine's or another run's)."""
    _ip("link", "add", "eth0", "netns", host, "type", "veth", "peer", peer, "netns", peer_namespace)


def _setns(libc: ctypes.CDLL, fd: int, what: str) -> None:
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot enter {what}: {os.strerror(code)}")
