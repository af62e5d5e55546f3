"""The first thing `asyncgrad` (the command) does: a Ctrl-C while it starts ends it quietly.

Importing the package takes a few tenths of a second (numpy); Python's own SIGINT handling
would print a `KeyboardInterrupt` traceback from inside numpy. `asyncgrad/__init__.py`
calls `while_starting()` before its imports; it does something only when this process is
the command (`asyncgrad ...` or `python -m asyncgrad ...`), never for a program that
imports the library. `asyncgrad.cli.main` gives SIGINT back to Python once it runs.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["is_the_command", "while_starting"]


def is_the_command() -> bool:
    """Whether this process is `asyncgrad ...` or `python -m asyncgrad ...`."""
    argv = getattr(sys, "orig_argv", [])
    by_module = "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "asyncgrad"
    return by_module or os.path.basename(sys.argv[0] if sys.argv else "") == "asyncgrad"


def while_starting() -> None:
    """Until `cli.main` runs, a Ctrl-C exits 130 with one line instead of a traceback."""
    if is_the_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # Nothing has started yet, nothing to stop; SystemExit unwinds without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
    print("asyncgrad: interrupted while starting", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)
