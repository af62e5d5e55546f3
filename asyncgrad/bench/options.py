"""`asyncgrad bench`'s options: the command line, and what every workload is run with.

Only the standard library: the CLI imports this to build its parser, for every command.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AGAINST", "TORCH_HINT", "Options", "Progress", "add_arguments", "check"]

AGAINST = ("torch",)
TORCH_HINT = (
    "--against torch needs PyTorch: pip install -e '.[torch]' "
    "(CPU only: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)
DEFAULT_REPEAT_AGAINST = 3


@dataclass(frozen=True)
class Progress:
    """Lines on stderr for a person watching. `step`: what runs now, only when someone is
    watching (`interactive`); `notice`: always, for what would else puzzle a reader of
    the log (a fault the soak injects, the warnings it will cause)."""

    interactive: bool = False

    def step(self, text: str) -> None:
        if self.interactive:
            print(text, file=sys.stderr, flush=True)

    def notice(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    """`quick`: about 10x fewer iterations; `redis_url`: None starts an embedded Redis;
    `soak_steps`: the soak's length, if not its default; `failure_timeout`: the soak's
    agents' (its workers' and its driver's); `progress`: where to say what runs; `trace`:
    where the trace of a workload's last step goes (`PATH.json`, and `PATH.png`)."""

    quick: bool = False
    redis_url: str | None = None
    namespace: str = field(default_factory=lambda: "bench-" + uuid.uuid4().hex[:8])
    soak_steps: int | None = None
    failure_timeout: float = 5.0
    progress: Progress = field(default_factory=Progress)
    trace: Path | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `asyncgrad bench` (besides --redis and --namespace, which every
    command that talks to Redis takes)."""
    parser.add_argument("--only", help="comma-separated workloads or prefixes, e.g. B1,B6")
    parser.add_argument(
        "--json", type=Path, metavar="PATH",
        help="write all results here (on a terminal the table is printed too; piped, "
        "stdout carries one JSON line per result)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="about 10x fewer iterations")
    parser.add_argument(
        "--against", choices=AGAINST,
        help="run PyTorch's side of each workload too, alternately with asyncgrad's, and "
        "print both and their ratio (needs pip install -e '.[torch]')",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=_runs, metavar="N",
        help=f"runs of each workload (per side); the figures are their medians "
        f"(default 1, {DEFAULT_REPEAT_AGAINST} with --against)",
    )  # fmt: skip
    parser.add_argument(
        "--soak", action="store_true",
        help="instead: the soak (S1), chaos (S2) and faults (S3) runs, 10,000 steps each "
        "(--quick: 1,000)",
    )  # fmt: skip
    parser.add_argument("--soak-steps", type=int, metavar="N", help="with --soak: N steps")
    parser.add_argument(
        "--failure-timeout", type=_seconds, default=5.0, metavar="SECONDS",
        help="with --soak: the agents' failure timeout (default 5)",
    )  # fmt: skip
    parser.add_argument("--scale", action="store_true", help="B2 at 1-8 workers, B4 at 2-8 instead")
    parser.add_argument(
        "--trace", type=Path, metavar="DIR",
        help="write the timeline of the last step of each workload that has steps (B4, "
        "B5) to DIR/NAME.json and, with matplotlib, DIR/NAME.png",
    )  # fmt: skip


def check(args: argparse.Namespace) -> None:
    """ValueError for options that do not go together (bad usage: exit 2)."""
    if args.soak_steps is not None and (not args.soak or args.soak_steps < 2):
        raise ValueError("--soak-steps takes a number of steps (2 or more), with --soak")
    if args.scale and args.soak:
        raise ValueError("--scale and --soak are different runs: pick one")
    if args.against and (args.soak or args.scale):
        raise ValueError("--against compares the workloads B1-B6, not --soak or --scale")
    if args.repeat is None:
        args.repeat = DEFAULT_REPEAT_AGAINST if args.against else 1


def _runs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a number of runs (1 or more), not {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value
