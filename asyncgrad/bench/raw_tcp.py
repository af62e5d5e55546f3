"""The floor of a host-to-host echo: the same bytes echoed over one plain TCP connection.

`python -m asyncgrad.bench.raw_tcp ADDRESS` serves on ADDRESS (a simulated host's): it
prints its port, then echoes the messages of one connection (an 8-byte length, then that
many bytes) until the client closes it. Both ends receive each message whole into a fresh
numpy array and send from the array, as a receiver that keeps the tensor would: what an
echo costs with no broker and no encoding, only the kernel's copies.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from types import TracebackType
from typing import Any, Self

import numpy as np

from asyncgrad.embedded import die_with_parent
from asyncgrad.local_cluster import one_thread_env
from asyncgrad.simulated_hosts import SimulatedHost

__all__ = ["EchoServer", "echo_bandwidth", "serve"]

HEADER = struct.Struct("!Q")
START_TIMEOUT_S = 30.0

Float32s = np.ndarray[Any, np.dtype[np.float32]]


def serve(address: str) -> None:
    """Echo the messages of one connection on `address` (a port of the kernel's choice,
    printed on stdout first)."""
    with socket.create_server((address, 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        connection, _ = listener.accept()
    with connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = bytearray(HEADER.size)
        while _receive(connection, memoryview(header), eof_ok=True):
            (size,) = HEADER.unpack(header)
            message = np.empty(size, dtype=np.uint8)
            _receive(connection, message.data)
            connection.sendall(message.data)


def echo_bandwidth(address: str, port: int, sizes: list[tuple[str, int, int]]) -> dict[str, Any]:
    """B3's echoes (label, bytes, timed reps; one warm-up each) against the server at
    `address:port`: GB/s as B3 counts them, `raw_tcp_`-prefixed."""
    figures: dict[str, float] = {}
    rng = np.random.default_rng(0)
    with socket.create_connection((address, port), timeout=START_TIMEOUT_S) as sock:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for label, nbytes, reps in sizes:
            sent = rng.standard_normal(nbytes // 4, dtype=np.float32)
            _echo(sock, sent)  # warm-up
            started = time.perf_counter_ns()
            for _ in range(reps):
                back = _echo(sock, sent)
            total = (time.perf_counter_ns() - started) / 1e9
            assert np.array_equal(back, sent)
            figures[f"raw_tcp_GBps_{label}"] = 2 * nbytes * reps / total / 1e9
    return figures


def _echo(sock: socket.socket, sent: Float32s) -> Float32s:
    sock.sendall(HEADER.pack(sent.nbytes))
    sock.sendall(sent.data)
    back = np.empty_like(sent)
    _receive(sock, back.data.cast("B"))
    return back


def _receive(sock: socket.socket, into: memoryview, eof_ok: bool = False) -> bool:
    """Fill `into`; False at a clean end of the stream before its first byte (`eof_ok`)."""
    got = 0
    while got < len(into):
        n = sock.recv_into(into[got:])
        if n == 0:
            if eof_ok and got == 0:
                return False
            raise ConnectionError(f"the peer closed after {got} of {len(into)} bytes")
        got += n
    return True


class EchoServer:
    """`serve` in a process of its own on `host`; `port` once entered. Ended on exit."""

    def __init__(self, host: SimulatedHost) -> None:
        self.host = host
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        argv = [*self.host.prefix, sys.executable, "-m", "asyncgrad.bench.raw_tcp"]
        self._process = process = subprocess.Popen(
            [*argv, self.host.address],
            stdout=subprocess.PIPE,
            env=one_thread_env(),
            preexec_fn=die_with_parent(),
        )
        try:
            self.port = int(_first_line(process, time.monotonic() + START_TIMEOUT_S))
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end()

    def _end(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()  # if still there: it ends by itself once the client closes
        process.wait(START_TIMEOUT_S)
        if process.stdout is not None:
            process.stdout.close()


def _first_line(process: subprocess.Popen[bytes], deadline: float) -> str:
    assert process.stdout is not None
    fd, seen = process.stdout.fileno(), b""
    while b"\n" not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            code = process.poll()
            why = f"exited with code {code}" if code is not None else "said nothing in time"
            raise RuntimeError(f"the raw TCP echo server {why}")
        seen += chunk
    return seen.split(b"\n", 1)[0].decode()


if __name__ == "__main__":
    serve(sys.argv[1])
