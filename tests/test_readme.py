"""README stays true to the code: every code block in it runs as written, its layout names
every module, and the sizes it gives for the Redis client are the files' (within 10%).

How each fenced block is checked (one test per `## ` section, its blocks in README's order):

- ```text: output or a listing; not run.
- ```python whose first line is `# examples/PATH.py: ...`: that file, byte for byte; the
  section's commands run it (examples/retry.py runs in the model-parallel example).
- any other ```python: a complete program, run with `python -c` from the repository's root.
- ```bash: each command (a line, split at `&&`), from the repository's root, with
  `$ASYNCGRAD_REDIS_URL` naming a Redis of the section's own (so README's commands keep
  their default namespace and share a Redis with nothing):
  - one that matches PARSE_ONLY below is not run, for the reason given there; if it is an
    `asyncgrad` command, the real CLI parser must accept it. A parse-only `export` makes
    the rest of its block parse-only too (the commands after it need what it names).
  - `asyncgrad up ...` starts in the background, and the test waits for the URL it prints;
    an `export ASYNCGRAD_REDIS_URL=...PORT...` after it must match that URL, and sets it.
  - `export NAME=VALUE` sets NAME for the section's later commands.
  - `COMMAND &` starts in the background; it must be `asyncgrad worker`, and the test waits
    for its `event=worker_serving` log line, as README asks its reader to.
  - anything else runs in bash and must exit 0.
  When the block ends, what it started in the background gets SIGINT (Ctrl-C), the last
  started first, and must exit 0: a block is a terminal session run through.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

import asyncgrad
from asyncgrad.cli import _parser
from asyncgrad.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(asyncgrad.__file__).parent
README = (ROOT / "README.md").read_text()

# Commands the test parses but does not run, each with the reason (a regex on the command,
# its words joined by single spaces, quotes removed).
PARSE_ONLY: list[tuple[str, str]] = [
    (r"^python3 -m venv ", "makes a virtualenv: done by hand (the tests run inside one)"),
    (r"^\. \S+/bin/activate$", "enters that virtualenv"),
    (r"^pip install ", "installs the package: done by hand in a fresh virtualenv"),
    (r"^(\w+=\S* )*pytest\b", "the test suite itself"),
    (r"^asyncgrad bench\b", "minutes of benchmarks and soaks; tests/test_bench.py runs them short"),
    (r"^asyncgrad status\b.*--watch\b", "a live view, until Ctrl-C"),
    (r"^docker compose ", "no Docker engine here; tests/test_docker.py checks compose and image"),
    (
        r"^export ASYNCGRAD_REDIS_URL=rediss://\S*@redis\.example",
        "a TLS Redis with ACL users at a placeholder host; tests/test_security.py runs both",
    ),
]

COMMAND_TIMEOUT = 45.0  # seconds for one foreground command or program
READY_TIMEOUT = 20.0  # seconds for a background command to say it is ready
STOP_TIMEOUT = 15.0  # seconds for a background command to exit after Ctrl-C
FILE_HEADER = re.compile(r"# (examples/[\w/]+\.py)(?::|\n)")


@dataclass
class Block:
    language: str
    text: str


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _sections() -> dict[str, list[Block]]:
    sections: dict[str, list[Block]] = {}
    for part in re.split(r"^## ", "## (top)\n" + README, flags=re.MULTILINE)[1:]:
        title = part.split("\n", 1)[0]
        blocks = [
            Block(lang, text)
            for lang, text in re.findall(r"^```(\S*)\n(.*?)^```$", part, re.M | re.S)
        ]
        if blocks:
            sections[title] = blocks
    return sections


def test_every_block_says_what_it_is() -> None:
    languages = {b.language for blocks in _sections().values() for b in blocks}
    assert languages <= {"python", "bash", "text"}, "fence output as ```text, code by language"


def test_every_example_file_is_in_the_readme() -> None:
    shown = {
        m.group(1)
        for blocks in _sections().values()
        for b in blocks
        if b.language == "python" and (m := FILE_HEADER.match(b.text))
    }
    headed = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "examples").rglob("*.py")
        if FILE_HEADER.match(p.read_text())
    }
    assert headed == shown


class Output:
    """A child's output, read by a thread (a full pipe would block the child)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                with self._changed:
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first line matching `pattern`; None once the stream ends or after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if match := re.search(pattern, line):
                        return match
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def join(self) -> str:
        self._thread.join(STOP_TIMEOUT)
        return "\n".join(self.lines)


@dataclass
class Shell:
    """What a reader's terminal holds while they follow one section: variables, jobs."""

    env: dict[str, str]
    jobs: list[tuple[str, subprocess.Popen[bytes], Output]] = field(default_factory=list)
    up_url: str | None = None

    def start(self, command: str, argv: list[str], ready: str) -> re.Match[str]:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        output = Output(process.stdout)
        self.jobs.append((command, process, output))
        match = output.wait_for(ready, READY_TIMEOUT)
        if match is None:
            process.kill()
            pytest.fail(f"{command!r} never printed {ready!r}:\n{output.join()}")
        return match

    def stop_all(self, check: bool = True) -> None:
        """Ctrl-C each background command, the last started first; each must exit 0."""
        failures = []
        for command, process, output in reversed(self.jobs):
            process.send_signal(signal.SIGINT)
            try:
                code = process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
                code = None
            log = output.join()
            if code != 0:
                failures.append(f"{command!r} exited {code} after Ctrl-C:\n{log}")
        self.jobs.clear()
        assert not (check and failures), "\n".join(failures)


def _parse_only_reason(command: str) -> str | None:
    return next((reason for pattern, reason in PARSE_ONLY if re.search(pattern, command)), None)


def _parse(argv: list[str]) -> None:
    """An `asyncgrad` command line must be one the real CLI accepts."""
    while argv and re.fullmatch(r"\w+=.*", argv[0]):
        argv = argv[1:]
    # Only the command's own words: up to a pipe or redirection.
    argv = list(itertools.takewhile(lambda w: not re.fullmatch(r"[|;<>]|\d?>>?\S*|\|\|", w), argv))
    if not argv or argv[0] != "asyncgrad":
        return
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            _parser().parse_args(argv[1:])
        except SystemExit as e:
            if e.code:
                pytest.fail(f"the CLI refuses {shlex.join(argv)!r}: {errors.getvalue()}")


def _commands(script: str) -> Iterator[tuple[list[str], str]]:
    """Each command of a bash block, as words (comments dropped), split at `&&`, and as the
    text bash runs (the line itself when it is one command: pipes and quotes kept)."""
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "&&" not in words:
            if words:
                yield words, line
            continue
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            yield words[:end], shlex.join(words[:end])
            words = words[end + 1 :]


def _run_bash(shell: Shell, script: str) -> None:
    parse_only: str | None = None
    for argv, text in _commands(script):
        command = " ".join(argv)
        reason = parse_only or _parse_only_reason(command)
        if reason:
            _parse(argv)
            if argv[0] == "export":
                parse_only = reason
            continue
        if argv[0] == "export":
            _export(shell, argv[1:])
        elif argv[:2] == ["asyncgrad", "up"]:
            _parse(argv)
            shell.up_url = shell.start(command, argv, r"^((redis|unix)://\S+)$").group(1)
        elif argv[-1] == "&":
            assert argv[:2] == ["asyncgrad", "worker"], (
                f"only workers run in the background: {command!r}"
            )
            _parse(argv[:-1])
            shell.start(command, argv[:-1], r"event=worker_serving")
        else:
            _parse(argv)
            _run(shell, ["bash", "-c", text], command)


def _export(shell: Shell, assignments: list[str]) -> None:
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if "PORT" in value:  # the placeholder for the port `asyncgrad up` printed
            assert shell.up_url is not None, f"export {assignment}: no `asyncgrad up` before it"
            shape = re.escape(value).replace("PORT", r"\d+")
            assert re.fullmatch(shape, shell.up_url), (assignment, shell.up_url)
            value = shell.up_url
        shell.env[name] = value


def _run(shell: Shell, argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(
            argv, cwd=ROOT, env=shell.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what!r} still running after {COMMAND_TIMEOUT} s: {e.output!r} {e.stderr!r}")
    assert done.returncode == 0, f"{what!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


def _env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCGRAD_")}
    if server := os.environ.get("ASYNCGRAD_REDIS_SERVER"):
        env["ASYNCGRAD_REDIS_SERVER"] = server
    # `asyncgrad` and `python` are this virtualenv's, as after `. .venv/bin/activate`.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["ASYNCGRAD_REDIS_URL"] = redis_url
    return env


@pytest.mark.timeout(60)
@pytest.mark.parametrize("title", list(_sections()))
def test_every_block_runs_as_written(title: str) -> None:
    with EmbeddedRedis(os.environ.get("ASYNCGRAD_REDIS_SERVER")) as redis:
        shell = Shell(_env(redis.url))
        ran = False
        try:
            for block in _sections()[title]:
                if block.language == "bash":
                    _run_bash(shell, block.text)
                    shell.stop_all()
                elif block.language == "python" and (header := FILE_HEADER.match(block.text)):
                    path = ROOT / header.group(1)
                    assert path.exists(), f"README shows {header.group(1)}, which is not there"
                    assert block.text == path.read_text(), f"README's {header.group(1)} differs"
                elif block.language == "python":
                    _run(shell, [sys.executable, "-c", block.text], block.text.splitlines()[0])
            ran = True
        finally:
            shell.stop_all(check=ran)  # a failure above is the one to report


def test_the_layout_names_every_module() -> None:
    layout = _section("Layout")
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    for package in ("transport", "rpc", "dist_autograd", "workloads"):
        names |= {p.stem for p in (PACKAGE / package).glob("*.py") if p.stem != "__init__"}
    missing = {n for n in names if not re.search(rf"\b{n}\b", layout)}
    assert missing == set()


def test_the_client_sizes_are_the_files() -> None:
    claim = _section("How it works")
    for path, stated in re.findall(r"`(transport/\w+\.py)` \(~(\d+)", claim):
        lines = len((PACKAGE / path).read_text().splitlines())
        assert abs(lines - int(stated)) <= 0.1 * lines, (path, lines, stated)
    total = int(re.search(r"It is ~(\d+) lines", claim).group(1))  # type: ignore[union-attr]
    files = ("resp", "cluster", "slots")
    actual = sum(len((PACKAGE / "transport" / f"{f}.py").read_text().splitlines()) for f in files)
    assert abs(actual - total) <= 0.1 * actual
