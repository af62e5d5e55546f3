"""The benchmarks' echo function: `asyncgrad worker worker1 --import workers.echo`."""

from asyncgrad.workloads.echo import echo

__all__ = ["echo"]
