"""The `asyncgrad` command: parse arguments, configure logging, run one command.

A command is a function `(args) -> exit code` plus one block in `_parser()` that declares
its options and registers it with `set_defaults(run=...)`. A failure exits 1 with one line
on stderr (a traceback too with `--debug`); bad usage exits 2, as argparse does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from urllib.parse import urlsplit

from asyncgrad.bench import options as bench_options
from asyncgrad.embedded import EmbeddedRedis, EmbeddedRedisError, PortInUse
from asyncgrad.transport import DEFAULT_INLINE_LIMIT

__all__ = ["UsageError", "main"]

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad usage found once the arguments parsed (a malformed URL, a job that is not one):
    exit 2, like argparse's own errors, with one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `asyncgrad` command line and return its exit code."""
    # From here on, a Ctrl-C unwinds (KeyboardInterrupt): what started is stopped below.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose, getattr(args, "lifecycle_logs", True))
    run: Command = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"asyncgrad: interrupted: {_stopped(args)}", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"asyncgrad {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the one place a command's failure is finally handled
        if args.debug:
            traceback.print_exc()
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"asyncgrad: error: {message}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncgrad", description="Distributed autograd on Redis streams."
    )
    _global_options(parser, default=False)
    # Each command takes them too (`asyncgrad up -v`); SUPPRESS keeps an earlier `-v`.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Command, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(run=run, command=name)
        return sub

    up = command("up", _up, "run an embedded Redis in the foreground and print its URL")
    up.add_argument("--port", type=_port, default=6379, help="TCP port; 0 picks a free one")

    worker = command("worker", _worker, "serve exposed functions until SIGINT/SIGTERM")
    worker.add_argument("name", help="the worker's name, unique in its namespace")
    _connection_options(worker)
    worker.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a module that exposes functions (repeatable)",
    )  # fmt: skip
    worker.add_argument(
        "--failure-timeout", type=_positive, default=5.0, metavar="SECONDS",
        help="heartbeats missed this long make the worker suspected (default 5)",
    )  # fmt: skip
    worker.add_argument(
        "--rref-lease", type=_positive, default=300.0, metavar="SECONDS",
        help="what a holder unreachable this long held here is freed (default 300)",
    )  # fmt: skip
    worker.add_argument(
        "--data-plane", choices=("direct", "redis"), default="direct",
        help="large arrays go directly between agents (default), or all through Redis",
    )  # fmt: skip
    worker.add_argument(
        "--inline-limit", type=_bytes, default=DEFAULT_INLINE_LIMIT, metavar="BYTES",
        help=f"arrays above this go by the data plane (default {DEFAULT_INLINE_LIMIT})",
    )  # fmt: skip
    worker.add_argument(
        "--data-host", metavar="HOST",
        help="where the data port listens (default: the address that reaches Redis); "
        "$ASYNCGRAD_DATA_HOST: the address advertised to other hosts",
    )  # fmt: skip
    worker.add_argument(
        "--data-port", type=_port, default=0, help="the data port (default: any free one)"
    )

    run = command(
        "run", _run,
        "run a job: MODULE:FUNCTION(agent), a coroutine function or a plain one; "
        "an int it returns is the exit code",
    )  # fmt: skip
    run.set_defaults(lifecycle_logs=False)
    run.add_argument("job", metavar="MODULE:FUNCTION")
    _connection_options(run)
    run.add_argument("--name", default="job", help="the job agent's name (default: job)")
    run.add_argument(
        "--spawn", action="append", default=[], metavar="NAME=MODULE[,MODULE]",
        help="start a local worker first (repeatable); stopped when the job ends",
    )  # fmt: skip

    status = command("status", _status, "live workers, heartbeat age, inbox backlog, open contexts")
    status.set_defaults(lifecycle_logs=False)
    _connection_options(status)
    status.add_argument(
        "--json", action="store_true",
        help='one JSON object: {"namespace": ..., "workers": [{"name", "id", "alive", ...}]}',
    )  # fmt: skip
    status.add_argument(
        "--watch", action="store_true",
        help="refresh until Ctrl-C, with the messages each agent receives per second",
    )  # fmt: skip
    status.add_argument(
        "--interval", type=_positive, default=1.0, metavar="SECONDS",
        help="with --watch: seconds between refreshes (default 1)",
    )  # fmt: skip
    status.add_argument(
        "--gone-for", type=_positive, default=300.0, metavar="SECONDS",
        help="list a crashed agent this long after it was last seen (default 300)",
    )  # fmt: skip

    trace = command(
        "trace", _trace,
        "gather the recent spans of a namespace's live workers: a Chrome/Perfetto trace file",
    )  # fmt: skip
    trace.set_defaults(lifecycle_logs=False)
    _connection_options(trace)
    trace.add_argument(
        "--out", default=None, metavar="PATH",
        help="the trace-event JSON file (default: trace.json, unless only --png is given)",
    )  # fmt: skip
    trace.add_argument(
        "--png", default=None, metavar="PATH", help="also draw the timeline as a PNG picture"
    )
    trace.add_argument(
        "--context", type=_context_id, default=None, metavar="ID",
        help="only this distributed autograd context's spans (decimal or 0x hex)",
    )  # fmt: skip
    trace.add_argument(
        "--steps", type=_positive_int, default=None, metavar="N",
        help="only the last N steps (distributed autograd contexts) and what ran meanwhile",
    )  # fmt: skip
    trace.add_argument(
        "--summary", action="store_true",
        help="also print where each worker's time went, per step (README, 'Tracing')",
    )  # fmt: skip
    trace.add_argument(
        "--timeout", type=_positive, default=5.0, metavar="SECONDS",
        help="how long to wait for each worker's spans (default 5)",
    )  # fmt: skip

    demo = command("demo", _demo, "train an MLP: a parameter server and two trainers")
    demo.set_defaults(lifecycle_logs=False)
    demo.add_argument("--redis", metavar="URL", help="use this Redis (default: an embedded one)")
    demo.add_argument("--namespace", default=None, help="default: a fresh one")
    demo.add_argument(
        "--steps", type=_positive_int, default=300, help="steps per trainer (default 300)"
    )
    demo.add_argument(
        "--trace", default=None, metavar="PATH",
        help="write the last steps' trace there (JSON; a picture if PATH ends .png)",
    )  # fmt: skip

    bench = command(
        "bench", _bench, "the benchmark workloads of docs/BENCH.md; --against torch: PyTorch's too"
    )
    bench.set_defaults(lifecycle_logs=False)
    bench_options.add_arguments(bench)
    _connection_options(bench)
    bench.set_defaults(namespace=None)

    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return int(text)


def _bytes(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a number of bytes, not {text!r}")
    return int(text)


def _context_id(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a context id: {text!r}") from None


def _port(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0-65535, not {text!r}")
    return int(text)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="redis://, rediss://, unix:// or redis+cluster://host:port,... "
        "(default: $ASYNCGRAD_REDIS_URL)",
    )
    parser.add_argument("--namespace", default="asyncgrad", help="default: asyncgrad")


def _redis_url(args: argparse.Namespace) -> str:
    """The URL of `--redis`, else of $ASYNCGRAD_REDIS_URL, else the default; a malformed
    one is bad usage."""
    from asyncgrad.transport.resp import DEFAULT_URL, RedisAddress

    url = args.redis or os.environ.get("ASYNCGRAD_REDIS_URL") or DEFAULT_URL
    try:
        RedisAddress.from_url(url)
    except ValueError as e:
        source = "--redis" if args.redis else "$ASYNCGRAD_REDIS_URL"
        shown = _without_password(url)
        reason = str(e).replace(repr(url), "").replace(url, shown).lstrip(": ")
        raise UsageError(
            f"{source} {shown!r} is not a Redis URL: {reason}; e.g. redis://HOST:6379/0"
        ) from e
    return str(url)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _where(args: argparse.Namespace, url: str) -> str:
    """Where a command looked, for a message: the URL without its password, and a hint
    when it is the default because neither --redis nor $ASYNCGRAD_REDIS_URL gave one."""
    from asyncgrad.transport.resp import RedisAddress

    where = f"namespace {args.namespace!r} at {RedisAddress.from_url(url)}"
    if not args.redis and not os.environ.get("ASYNCGRAD_REDIS_URL"):
        where += " (the default Redis: pass --redis URL or export ASYNCGRAD_REDIS_URL)"
    return where


def _stopped(args: argparse.Namespace) -> str:
    """What a Ctrl-C stopped, for its one line."""
    if args.command == "run":
        spawned = ", ".join(getattr(args, "spawn_names", []))
        workers = f" and the workers it started ({spawned})" if spawned else ""
        return f"stopped job {args.name!r}{workers}"
    if args.command == "demo":
        from asyncgrad.job import DEMO_WORKERS

        redis = "" if args.redis else " and its Redis"
        return f"stopped the demo's job, its workers {', '.join(DEMO_WORKERS)}{redis}"
    if args.command == "worker":
        return f"stopped worker {args.name!r} before it served"
    return f"stopped {args.command}"


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logs")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks")


def _configure_logging(verbose: bool, lifecycle: bool = True) -> None:
    """Daemons log their lifecycle (INFO); interactive commands only warnings, unless -v."""
    # Every field key=value, the time too, so a line splits on spaces into a dict.
    logging.basicConfig(
        format="time=%(asctime)s.%(msecs)03d level=%(levelname)s logger=%(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    quiet = logging.INFO if lifecycle else logging.WARNING
    logging.getLogger("asyncgrad").setLevel(logging.DEBUG if verbose else quiet)


def _up(args: argparse.Namespace) -> int:
    server = os.environ.get("ASYNCGRAD_REDIS_SERVER")
    try:
        with _stop_on_signals(), EmbeddedRedis(server, port=args.port) as redis:
            print(redis.url, flush=True)
            code = redis.wait()
    except _Stop as stop:
        logger.info("event=up_stopped signal=%s", stop.args[0])
        return 0
    except PortInUse as e:
        raise PortInUse(f"{e.args[0].splitlines()[0]}; pass --port 0 to pick a free port") from e
    raise EmbeddedRedisError(f"redis-server exited unexpectedly with code {code}")


def _worker(args: argparse.Namespace) -> int:
    from asyncgrad.worker import Worker

    worker = Worker(
        args.name,
        imports=args.imports,
        redis_url=_redis_url(args),
        namespace=args.namespace,
        failure_timeout=args.failure_timeout,
        rref_lease=args.rref_lease,
        data_plane=args.data_plane,
        inline_limit=args.inline_limit,
        data_host=args.data_host,
        data_port=args.data_port,
    )
    return worker.run()


def _run(args: argparse.Namespace) -> int:
    from asyncgrad.job import JobError, parse_spawns, resolve_job, run_job

    url = _redis_url(args)
    try:
        spawns = parse_spawns(args.spawn)
        args.spawn_names = list(spawns)
        job = resolve_job(args.job)
        return run_job(job, url, args.namespace, args.name, spawns)
    except JobError as e:
        raise UsageError(str(e)) from e


def _demo(args: argparse.Namespace) -> int:
    from asyncgrad.job import run_demo

    if args.redis:
        _redis_url(args)
    if args.trace:
        from asyncgrad.tracing import timeline

        timeline.check_save(args.trace)  # a picture's matplotlib, before the demo runs
    return run_demo(args.redis, args.namespace, args.steps, args.trace)


def _trace(args: argparse.Namespace) -> int:
    from asyncgrad import tracefile
    from asyncgrad.tracing import timeline
    from asyncgrad.worker import run_loop

    url = _redis_url(args)
    paths = [p for p in (args.out or (None if args.png else "trace.json"), args.png) if p]
    for path in paths:
        timeline.check_save(path)
    trace = run_loop(tracefile.collect(url, args.namespace, args.context, args.timeout))
    if not any(e.get("ph") == "M" for e in trace):
        raise RuntimeError(f"no live agents in {_where(args, url)}")
    if args.steps is not None:
        trace = timeline.window(trace, args.steps)
    for path in paths:
        timeline.save(trace, path, namespace=args.namespace, context_id=args.context)
    tracefile.report(trace, paths)
    if args.summary:
        from asyncgrad.tracing import breakdown

        print(breakdown.table(trace))
    return 0


def _status(args: argparse.Namespace) -> int:
    from asyncgrad import status
    from asyncgrad.worker import run_loop

    url = _redis_url(args)
    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):  # how a watch ends
            run_loop(status.watch(url, args.namespace, args.interval, args.gone_for, args.json))
        return 0
    rows = run_loop(status.collect(url, args.namespace, args.gone_for))
    if args.json:
        status.render_json(rows, args.namespace, sys.stdout)
    else:
        status.render(rows, args.namespace)
    if not rows:
        hint = run_loop(status.elsewhere(url, args.namespace))
        print(f"asyncgrad status: no agents in {_where(args, url)}{hint}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    # The workloads import everything; only this command needs them.
    from asyncgrad.bench.suite import run_command

    return run_command(args)


class _Stop(Exception):
    """SIGINT or SIGTERM arrived; raised in the main thread to unwind `with` blocks."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum: int, frame: FrameType | None) -> None:
        for sig in previous:  # a second Ctrl-C must not interrupt the cleanup of the first
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
