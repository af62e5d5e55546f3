"""A trace drawn as a PNG: what `asyncgrad trace --png` writes, and the README's figure.

One band per worker, in the trace's sort order, its title at the left; within it one lane
per thread of the trace (`timeline`'s lanes: a kind of span, and more lanes of a kind for
spans in flight together), and a sub-row per level of nesting within a lane. Bars are
coloured by category, with their names inside where they fit. A span still open when the
trace was taken (what a stuck step waits on) is hatched, outlined and runs to the right
edge. A message is a light arrow from when Redis had it (the end of its writer's span) to
the span that handled it. A worker without spans (one that did not answer) is an empty
band that says so.

matplotlib (the `png` extra) is imported only to draw, and without pyplot: no backend is
chosen for the process, no figure outlives the call. The same trace gives the same bytes.

`scene` places the trace's events (no matplotlib there); `render` draws them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from asyncgrad.tracing.picture import render, scene
from asyncgrad.tracing.picture.render import COLOURS

__all__ = ["COLOURS", "PictureUnavailable", "draw", "require"]


class PictureUnavailable(RuntimeError):
    """Drawing needs matplotlib, which is not installed."""


def require() -> None:
    """`PictureUnavailable` now if `draw` would raise it: before a run's work, not after."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401 - its compiled parts, and Pillow
    except ImportError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PictureUnavailable(
            f"drawing a trace needs matplotlib ({why}): pip install 'asyncgrad[png]'"
        ) from e


def draw(
    trace: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    start_us: float | None = None,
    end_us: float | None = None,
) -> None:
    """Draw the trace's spans as a PNG at `path`: one band per worker (rows in sort-index
    order), one lane per thread within it, bars coloured by category, names inside bars
    where they fit, messages as thin arrows, a time axis in ms; `start_us`/`end_us` crop to
    a window (µs from the trace's start, as the events' `ts`).

    Raises ValueError when there is nothing to draw (no spans in the window), and
    `PictureUnavailable` when matplotlib is not installed."""
    placed = scene.scene(trace, start_us, end_us)
    require()
    import matplotlib

    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # the same picture whatever the user's matplotlibrc
        matplotlib.rcParams.update(
            {
                "font.size": 8,
                "hatch.color": render.STUCK,
                "hatch.linewidth": 0.8,
                "axes.unicode_minus": False,
            }
        )
        render.render(placed, path, title)
