"""A TCP proxy that delays each direction of a connection by its own amount: a link delay
for tests on simulated hosts where the kernel has no `netem` qdisc (CONFIG_NET_SCH_NETEM).

    python -m tests.delay_proxy LISTEN_HOST UPSTREAM_HOST:PORT [SOURCE=UP_MS/DOWN_MS ...]

Listens on LISTEN_HOST (a port of its choosing, printed as `listening HOST:PORT` once it
accepts) and forwards every connection to UPSTREAM. A connection from address SOURCE has
its bytes toward the upstream ("up") held UP_MS and those back ("down") DOWN_MS after they
were read, as if the link from that host delayed them; other sources get no delay. Each
direction keeps its order and its pace: a chunk read while an earlier one is held leaves
the delay after that one's arrival, not after it leaves.

A thread per direction reads, another writes (`time.sleep` until a chunk is due: ~0.1 ms
late at most on an idle machine). Runs until killed.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import sys
import threading
import time

_CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
    due: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()

    def read() -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(_CHUNK):
                due.put((time.monotonic() + delay_s, data))
        due.put(None)

    def write() -> None:
        try:
            while (item := due.get()) is not None:
                at, data = item
                if (wait := at - time.monotonic()) > 0:
                    time.sleep(wait)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # the other side is gone: so is this connection
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def main(argv: list[str]) -> None:
    listen_host, upstream = argv[0], argv[1]
    up_host, _, up_port = upstream.rpartition(":")
    delays: dict[str, tuple[float, float]] = {}
    for spec in argv[2:]:
        source, _, ms = spec.partition("=")
        up_ms, _, down_ms = ms.partition("/")
        delays[source] = (float(up_ms) / 1000, float(down_ms) / 1000)
    server = socket.create_server((listen_host, 0))
    print(f"listening {listen_host}:{server.getsockname()[1]}", flush=True)
    while True:
        client, (source, *_) = server.accept()
        try:
            upstream_sock = socket.create_connection((up_host, int(up_port)))
        except OSError:
            client.close()
            continue
        for sock in (client, upstream_sock):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up_s, down_s = delays.get(source, (0.0, 0.0))
        _pump(client, upstream_sock, up_s)
        _pump(upstream_sock, client, down_s)


if __name__ == "__main__":
    main(sys.argv[1:])
