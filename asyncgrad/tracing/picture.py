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
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncgrad.tracing.spans import CATEGORIES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.font_manager import FontProperties

__all__ = ["COLOURS", "PictureUnavailable", "draw"]

# A colour per category (Tableau 10): what a bar is, at a glance.
COLOURS = {
    "step": "#bab0ac",
    "call": "#4c78a8",
    "serve": "#54a24b",
    "backward": "#f58518",
    "optim": "#b279a2",
    "message": "#72b7b2",
    "redis": "#e45756",
    "data": "#9d755d",
}
_OTHER = "#d3d3d3"  # a category this module does not know
_STUCK = "#b2182b"  # unfinished spans' outline, and what an empty band says
_ARROW = "#303030"

_WIDTH_IN = 12.0
_DPI = 150
_MAX_BANDS_IN = 13.0  # the bands' height at most (rows get thinner beyond)
_ROW_IN = 0.19  # a sub-row's height at most
_BAR = 0.78  # of a sub-row, what a bar fills
_PAD = 0.3  # sub-rows above and below a band's lanes
_EPS_US = 1e-3  # timestamps closer than this (1 ns) are the same instant
_MAX_LABELS = 4000


class PictureUnavailable(RuntimeError):
    """Drawing needs matplotlib, which is not installed."""


@dataclass
class _Lane:
    tid: int
    title: str
    sort: float
    rows: int = 1  # levels of nesting
    y: float = 0.0  # its top, in sub-rows from the top of the picture


@dataclass
class _Band:
    pid: int
    name: str
    note: str  # the rest of the worker's title: its clock, or why it gave no spans
    sort: float
    lanes: dict[int, _Lane] = field(default_factory=dict)
    spans: int = 0
    top: float = 0.0
    bottom: float = 0.0


@dataclass
class _Bar:
    left: float  # ms
    right: float  # ms
    row: float  # the top of its sub-row
    cat: str
    name: str
    open: bool


@dataclass
class _Scene:
    """What to draw, in ms across and sub-rows down (0: the top), matplotlib aside."""

    bands: list[_Band]
    bars: list[_Bar]
    arrows: list[tuple[float, float, float, float]]  # from (ms, row) to (ms, row)
    lo: float  # the window, ms
    hi: float
    rows: float  # the height, in sub-rows
    cats: list[str]
    unfinished: int
    cropped: bool


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
    scene = _scene(trace, start_us, end_us)
    try:
        import matplotlib
        import matplotlib.backends.backend_agg  # its compiled parts, and Pillow
    except ImportError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PictureUnavailable(
            f"drawing a trace needs matplotlib ({why}): pip install 'asyncgrad[png]'"
        ) from e
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # the same picture whatever the user's matplotlibrc
        matplotlib.rcParams.update(
            {
                "font.size": 8,
                "hatch.color": _STUCK,
                "hatch.linewidth": 0.8,
                "axes.unicode_minus": False,
            }
        )
        _render(scene, path, title)


# ---------------------------------------------------------------------------------------
# The scene: the trace's events placed, without matplotlib.


def _scene(trace: Sequence[dict[str, Any]], start_us: float | None, end_us: float | None) -> _Scene:
    if start_us is not None and end_us is not None and end_us <= start_us:
        raise ValueError(f"the window ends ({end_us} µs) before it starts ({start_us} µs)")
    bands: dict[int, _Band] = {}
    titles: dict[tuple[int, int], tuple[str, float]] = {}
    spans: list[dict[str, Any]] = []
    flows: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}

    def band(pid: int) -> _Band:
        if pid not in bands:
            bands[pid] = _Band(pid, f"pid {pid}", "", float(pid))
        return bands[pid]

    for event in trace:
        kind, pid = event.get("ph"), event.get("pid")
        if not isinstance(pid, int):
            continue
        args = event.get("args") or {}
        if kind == "X":
            if _finite(event.get("ts")) and _finite(event.get("dur", 0)):
                spans.append(event)
        elif kind == "M" and event.get("name") == "process_name":
            b = band(pid)
            b.name, b.note = _split_title(str(args.get("name", "")), args.get("worker"), pid)
        elif kind == "M" and event.get("name") == "process_sort_index":
            band(pid).sort = float(args.get("sort_index", pid))
        elif kind == "M" and event.get("name") in ("thread_name", "thread_sort_index"):
            key = (pid, int(event.get("tid", 0)))
            name, sort = titles.get(key, ("", float(key[1])))
            if event["name"] == "thread_name":
                name = str(args.get("name", ""))
            else:
                sort = float(args.get("sort_index", key[1]))
            titles[key] = (name, sort)
        elif kind in ("s", "f") and "id" in event:
            pair = flows.setdefault(str(event["id"]), ([], []))
            pair[0 if kind == "s" else 1].append(event)
    if not spans:
        raise ValueError("the trace has no spans to draw (no complete events, ph 'X')")

    # The window: the spans' extent, or what was asked.
    first = min(float(e["ts"]) for e in spans)
    last = max(float(e["ts"]) + max(float(e.get("dur", 0)), 0.0) for e in spans)
    lo = first if start_us is None else float(start_us)
    hi = last + max((last - first) * 0.015, 1.0) if end_us is None else float(end_us)
    if hi <= lo:
        raise ValueError(f"no spans to draw after {lo / 1000:g} ms (the trace ends sooner)")

    # Lanes, and each span's level of nesting within its lane.
    for (pid, tid), (name, sort) in titles.items():
        band(pid).lanes[tid] = _Lane(tid, name, sort)
    by_lane: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for event in spans:
        key = (int(event["pid"]), int(event.get("tid", 0)))
        by_lane.setdefault(key, []).append(event)
    depth: dict[int, int] = {}  # id(event) -> level
    for (pid, tid), lane_spans in by_lane.items():
        b = band(pid)
        lane = b.lanes.setdefault(tid, _Lane(tid, str(lane_spans[0].get("cat", "")), tid))
        lane_spans.sort(key=lambda e: (float(e["ts"]), -_end(e)))
        ends: list[float] = []
        for event in lane_spans:
            ts = float(event["ts"])
            while ends and ends[-1] <= ts + _EPS_US:
                ends.pop()
            depth[id(event)] = len(ends)
            ends.append(_end(event))
            lane.rows = max(lane.rows, len(ends))

    # Rows, top to bottom.
    ordered = sorted(bands.values(), key=lambda b: (b.sort, b.pid))
    y = 0.0
    for b in ordered:
        b.top = y
        y += _PAD
        in_order = sorted(b.lanes.values(), key=lambda lane: (lane.sort, lane.tid))
        b.lanes = {lane.tid: lane for lane in in_order}
        for lane in b.lanes.values():
            lane.y = y
            y += lane.rows
        if not b.lanes:
            y += 1  # an empty band: one row, that says why
        y += _PAD
        b.bottom = y

    # Bars in the window, and where each span is (an arrow's ends).
    bars: list[_Bar] = []
    at: dict[tuple[int, int, float], tuple[float, float]] = {}  # (pid, tid, ts) -> end, row
    cats: set[str] = set()
    unfinished = 0
    for event in spans:
        pid, tid = int(event["pid"]), int(event.get("tid", 0))
        b = bands[pid]
        row = b.lanes[tid].y + depth[id(event)]
        ts, end = float(event["ts"]), _end(event)
        where = (pid, tid, ts)
        if where not in at or at[where][1] < row:  # the innermost of those starting together
            at[where] = (end, row)
        is_open = bool((event.get("args") or {}).get("unfinished"))
        if is_open:
            end = max(end, hi)  # what a stuck step waits on runs to the right edge
        if not (ts < hi and end > lo) and not (ts == end and lo <= ts <= hi):
            continue
        cat = str(event.get("cat", ""))
        bars.append(_Bar(ts / 1000, end / 1000, row, cat, str(event.get("name", "")), is_open))
        cats.add(cat)
        unfinished += is_open
        b.spans += 1
    if not bars:
        raise ValueError(f"no spans to draw between {lo / 1000:g} ms and {hi / 1000:g} ms")

    # Messages: from when Redis had it (its writer's span's end) to its handler's start.
    arrows: list[tuple[float, float, float, float]] = []
    for sources, targets in flows.values():
        for s, f in zip(sources, targets, strict=False):
            if not _finite(s.get("ts")) or not _finite(f.get("ts")):
                continue
            s_key = (int(s["pid"]), int(s.get("tid", 0)), float(s["ts"]))
            f_key = (int(f["pid"]), int(f.get("tid", 0)), float(f["ts"]))
            s_end, s_row = at.get(s_key, (s_key[2], _lane_row(bands, s_key)))
            f_row = at.get(f_key, (0.0, _lane_row(bands, f_key)))[1]
            x0 = s_end if s_end <= f_key[2] else s_key[2]
            x1 = f_key[2]
            if max(x0, x1) < lo or min(x0, x1) > hi:
                continue
            arrows.append((x0 / 1000, s_row, x1 / 1000, f_row))

    known = [c for c in CATEGORIES if c in cats]
    return _Scene(
        bands=ordered,
        bars=bars,
        arrows=arrows,
        lo=lo / 1000,
        hi=hi / 1000,
        rows=y,
        cats=known + sorted(cats - set(known)),
        unfinished=unfinished,
        cropped=start_us is not None or end_us is not None,
    )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _end(event: dict[str, Any]) -> float:
    return float(event["ts"]) + max(float(event.get("dur", 0)), 0.0)


def _lane_row(bands: dict[int, _Band], key: tuple[int, int, float]) -> float:
    band = bands.get(key[0])
    lane = band.lanes.get(key[1]) if band else None
    return lane.y if lane else (band.top + _PAD if band else 0.0)


def _split_title(title: str, worker: Any, pid: int) -> tuple[str, str]:
    """A worker's title, "name (note)", as its name and its note."""
    name = str(worker) if worker else title.split(" (")[0] or f"pid {pid}"
    rest = title[len(name) :].strip() if title.startswith(name) else title
    if rest.startswith("(") and rest.endswith(")"):
        rest = rest[1:-1]
    return name, rest


# ---------------------------------------------------------------------------------------
# The picture.


class _Measure:
    """Text widths in pixels, from each character's (cached: thousands of labels)."""

    def __init__(self, renderer: Any, props: FontProperties) -> None:
        self.renderer, self.props = renderer, props
        self.chars: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        total = 0.0
        for ch in text:
            if ch not in self.chars:
                width = self.renderer.get_text_width_height_descent(ch, self.props, ismath=False)
                self.chars[ch] = float(width[0])
            total += self.chars[ch]
        return total * 1.04 + 1

    def fit(self, text: str, room: float) -> str:
        """`text`, or as much of it as fits in `room` pixels with an ellipsis ("" if little)."""
        if self(text) <= room:
            return text
        keep = len(text)
        while keep > 3 and self(text[:keep] + "…") > room:
            keep = min(keep - 1, int(keep * room / max(self(text[:keep] + "…"), 1.0)) + 1)
        return text[:keep].rstrip(" .,:;_-") + "…" if keep > 3 else ""


def _render(scene: _Scene, path: str | os.PathLike[str], title: str | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    from matplotlib.transforms import Bbox, TransformedBbox, blended_transform_factory

    row_in = min(_ROW_IN, _MAX_BANDS_IN / scene.rows)
    row_pt = row_in * 72
    bands_in = scene.rows * row_in
    top_axis = bands_in > 4.5  # a tall picture: the time axis at the top too
    top_in = 0.72 + (0.2 if top_axis else 0.0)
    bottom_in = 0.5
    height_in = top_in + bands_in + bottom_in
    fig = Figure(figsize=(_WIDTH_IN, height_in), dpi=_DPI, facecolor="white")
    canvas: Any = FigureCanvasAgg(fig)  # Any: some of its methods are not annotated
    renderer = canvas.get_renderer()

    # Font sizes follow the rows' height; below legibility, the text is left out.
    lane_fs = min(7.0, row_pt * 0.72)
    label_fs = min(6.8, row_pt * _BAR * 0.78)
    name_fs = min(9.0, max(4.5, (1 + 2 * _PAD) * row_pt * 0.55))
    note_fs = min(6.8, name_fs * 0.8)
    name_w = _Measure(renderer, FontProperties(size=name_fs, weight="bold"))
    note_w = _Measure(renderer, FontProperties(size=note_fs))
    lane_w = _Measure(renderer, FontProperties(size=lane_fs))
    label_w = _Measure(renderer, FontProperties(size=label_fs))

    # The left margin: worker titles, then lane titles.
    column_px = 1.9 * _DPI
    names = [name_w.fit(b.name, column_px) for b in scene.bands]
    # an empty band says why in its row, where there is room
    notes = [note_w.fit(b.note, column_px) if b.lanes else "" for b in scene.bands]
    title_px = max([name_w(n) for n in names] + [note_w(n) for n in notes if n])
    lanes = [lane for b in scene.bands for lane in b.lanes.values()]
    show_lanes = lane_fs >= 3.5
    lane_titles = [lane_w.fit(lane.title, 1.2 * _DPI) for lane in lanes]
    lane_px = max(map(lane_w, lane_titles), default=0.0) if show_lanes else 0.0
    left_in = 0.12 + title_px / _DPI + 0.18 + lane_px / _DPI + 0.08
    right_in = 0.22
    axes_w_in = _WIDTH_IN - left_in - right_in
    ax: Axes = fig.add_axes(
        (
            left_in / _WIDTH_IN,
            bottom_in / height_in,
            axes_w_in / _WIDTH_IN,
            bands_in / height_in,
        )
    )
    ax.set_xlim(scene.lo, scene.hi)
    ax.set_ylim(0, scene.rows)
    ax.patch.set_visible(False)
    px_per_ms = axes_w_in * _DPI / (scene.hi - scene.lo)
    px_per_row = row_in * _DPI

    def up(row: float) -> float:  # sub-rows from the top -> the axes' y (upwards)
        return scene.rows - row

    # Bands: alternate shading across the titles too, a rule between two.
    across = blended_transform_factory(fig.transFigure, ax.transData)
    for i, b in enumerate(scene.bands):
        if i % 2:
            shade = Rectangle(
                (0, up(b.bottom)),
                1,
                b.bottom - b.top,
                transform=across,
                facecolor="#f3f4f7",
                edgecolor="none",
                zorder=-2,
                clip_on=False,
            )
            ax.add_artist(shade)
        if i:
            rule = Line2D([0.01, 1 - right_in / _WIDTH_IN], [up(b.top)] * 2, transform=across)
            rule.set(color="#c4c4c4", linewidth=0.6, zorder=-1, clip_on=False)
            ax.add_artist(rule)
    for b, name, note in zip(scene.bands, names, notes, strict=True):
        # the name (and the note, if there is room) from the band's top, in points
        band_pt = (b.bottom - b.top) * row_pt
        fs = min(name_fs, band_pt * 0.7)
        with_note = bool(note) and band_pt >= (fs + note_fs) * 1.35
        block = fs * 1.2 + (note_fs * 1.2 if with_note else 0.0)
        below = min(_PAD * row_pt, max(band_pt - block, 0.0) / 2)
        anchor = (0.12 / _WIDTH_IN, up(b.top))
        if fs >= 3:
            ax.annotate(
                name,
                anchor,
                xycoords=across,
                xytext=(0, -below),
                textcoords="offset points",
                fontsize=fs,
                weight="bold",
                va="top",
            )
        if with_note:
            ax.annotate(
                note,
                anchor,
                xycoords=across,
                xytext=(0, -below - fs * 1.2),
                textcoords="offset points",
                fontsize=note_fs,
                color="#666666",
                va="top",
            )
        if not b.spans:
            if b.lanes:  # it has spans, elsewhere
                why, colour = "no spans in this window", "#666666"
            else:
                why, colour = "no spans" + (f": {b.note}" if b.note else ""), _STUCK
            ax.text(
                scene.lo + 8 / px_per_ms,
                up((b.top + b.bottom) / 2),
                why,
                fontsize=min(8.0, name_fs),
                style="italic",
                color=colour,
                va="center",
            )
        for lane in list(b.lanes.values())[1:]:
            ax.axhline(up(lane.y), color="#e2e2e2", linewidth=0.4, zorder=-1)

    # Lane titles, as the y axis's labels.
    if show_lanes:
        ax.set_yticks([up(lane.y + lane.rows / 2) for lane in lanes])
        ax.set_yticklabels(lane_titles, fontsize=lane_fs, color="#555555")
    else:
        ax.set_yticks([])
    ax.tick_params(axis="y", length=0, pad=4)

    # Bars: one collection for the finished, one (hatched) for the unfinished; arrays, as
    # tens of thousands of bars are drawn at once.
    min_ms = 1.2 / px_per_ms  # the shortest span still shows, a pixel wide
    inset = (1 - _BAR) / 2
    palette = {cat: i for i, cat in enumerate(scene.cats)}
    faces = np.array([_rgb(COLOURS.get(cat, _OTHER)) for cat in scene.cats])
    spans = np.array([(b.left, b.right, b.row, palette[b.cat]) for b in scene.bars])
    is_open = np.array([b.open for b in scene.bars], dtype=bool)
    left = np.maximum(spans[:, 0], scene.lo - min_ms)
    right = np.maximum(np.minimum(spans[:, 1], scene.hi + min_ms), left + min_ms)
    low, high = scene.rows - (spans[:, 2] + 1 - inset), scene.rows - (spans[:, 2] + inset)
    boxes = np.stack(
        [np.stack(corner, axis=1) for corner in ((left, low), (left, high), (right, high))]
        + [np.stack((right, low), axis=1)],
        axis=1,
    )
    colours = faces[spans[:, 3].astype(int)]
    ax.add_collection(
        autolim=False,
        collection=PolyCollection(
            boxes[~is_open],
            facecolors=colours[~is_open],
            edgecolors="none",
            linewidths=0,
            zorder=2,
        ),
    )
    if is_open.any():
        ax.add_collection(
            autolim=False,
            collection=PolyCollection(
                boxes[is_open],
                facecolors=colours[is_open] + (1 - colours[is_open]) * 0.55,  # lighter
                edgecolors=_STUCK,
                linewidths=1.0,
                hatch="////",
                zorder=2.2,
            ),
        )

    # Names inside the bars wide enough for them, clipped to their bar whatever happens.
    if label_fs >= 4.0:
        labelled = 0
        for bar in scene.bars:
            left, right = max(bar.left, scene.lo), min(bar.right, scene.hi)
            room = (right - left) * px_per_ms - 6
            if room < 14:
                continue
            name = bar.name
            if name.startswith(bar.cat + " "):  # "call stage1.f": its lane and colour say "call"
                name = name[len(bar.cat) + 1 :]
            text = label_w.fit(name, room)
            if not text:
                continue
            colour = COLOURS.get(bar.cat, _OTHER)
            y0, y1 = up(bar.row + 1 - inset), up(bar.row + inset)
            label = ax.text(
                left + 3 / px_per_ms,
                (y0 + y1) / 2,
                text,
                fontsize=label_fs,
                color="#1a1a1a" if bar.open or _light(colour) else "white",
                va="center_baseline",
                zorder=3,
            )
            if bar.open:  # readable over the hatching
                label.set_bbox(
                    {"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 0.6}
                )
            label.set_clip_box(TransformedBbox(Bbox([[left, y0], [right, y1]]), ax.transData))
            labelled += 1
            if labelled >= _MAX_LABELS:
                break

    # Messages: light arrows, from the writer's bar edge to the handler's.
    if scene.arrows:
        shafts: list[list[tuple[float, float]]] = []
        heads: list[list[tuple[float, float]]] = []
        half = _BAR / 2
        for x0, r0, x1, r1 in scene.arrows:
            c0, c1 = r0 + 0.5, r1 + 0.5
            if r1 > r0:
                c0, c1 = c0 + half, c1 - half
            elif r1 < r0:
                c0, c1 = c0 - half, c1 + half
            # in pixels, upwards
            dx, dy = (x1 - x0) * px_per_ms, (c0 - c1) * px_per_row
            length = math.hypot(dx, dy)
            tip = (x1, up(c1))
            if length < 1:
                continue
            ux, uy = dx / length, dy / length
            head = min(5.0, length * 0.6)
            bx, by = -ux * head, -uy * head  # tip -> the head's base, px
            wx, wy = -uy * head * 0.38, ux * head * 0.38
            base = (tip[0] + bx / px_per_ms, tip[1] + by / px_per_row)
            shafts.append([(x0, up(c0)), base])
            heads.append(
                [
                    tip,
                    (base[0] + wx / px_per_ms, base[1] + wy / px_per_row),
                    (base[0] - wx / px_per_ms, base[1] - wy / px_per_row),
                ]
            )
        # the more arrows, the fainter: a few stand out, thousands make a haze, not a wall
        faint = min(1.0, math.sqrt(150 / len(shafts))) if shafts else 1.0
        ax.add_collection(
            autolim=False,
            collection=LineCollection(
                shafts, colors=_ARROW, linewidths=0.55, alpha=max(0.06, 0.4 * faint), zorder=4
            ),
        )
        ax.add_collection(
            autolim=False,
            collection=PolyCollection(
                heads,
                facecolors=_ARROW,
                edgecolors="none",
                alpha=max(0.1, 0.55 * faint),
                zorder=4,
            ),
        )

    # The time axis.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=14, steps=[1, 2, 2.5, 5, 10]))
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.xaxis.set_major_formatter(formatter)
    ax.tick_params(axis="x", labelsize=7, colors="#444444", length=3, top=top_axis)
    ax.tick_params(axis="x", labeltop=top_axis)
    ax.grid(axis="x", color="#dcdcdc", linewidth=0.5, zorder=-1)
    ax.set_axisbelow(True)
    ax.set_xlabel("ms since the trace's start", fontsize=7.5, color="#444444", labelpad=3)
    for side in ("left", "right"):
        ax.spines[side].set_visible(False)
    for side in ("top", "bottom"):
        ax.spines[side].set_color("#999999")
        ax.spines[side].set_linewidth(0.6)

    # The title, what the picture holds, and the legend.
    top = 1 - 0.1 / height_in
    fig.text(
        0.12 / _WIDTH_IN, top, title or "asyncgrad trace", fontsize=11, weight="bold", va="top"
    )
    workers = sum(1 for b in scene.bands if b.spans)
    summary = [
        f"{workers} worker{'s' * (workers != 1)}",
        f"{len(scene.bars)} span{'s' * (len(scene.bars) != 1)}",
    ]
    if scene.unfinished:
        summary.append(f"{scene.unfinished} unfinished")
    window = f"{scene.lo:.3f} to {scene.hi:.3f} ms" if scene.cropped else f"{scene.hi:.1f} ms"
    summary.append(window)
    fig.text(
        1 - right_in / _WIDTH_IN,
        top,
        " · ".join(summary),
        fontsize=8,
        color=_STUCK if scene.unfinished else "#555555",
        ha="right",
        va="top",
    )
    handles: list[Any] = [
        Patch(facecolor=COLOURS.get(cat, _OTHER), edgecolor="none", label=cat or "(none)")
        for cat in scene.cats
    ]
    if scene.unfinished:
        handles.append(
            Patch(
                facecolor="#f4d6d6",
                edgecolor=_STUCK,
                hatch="////",
                linewidth=1.0,
                label="unfinished",
            )
        )
    if scene.arrows:
        handles.append(
            Line2D(
                [],
                [],
                color=_ARROW,
                alpha=0.6,
                linewidth=0.8,
                marker=">",
                markersize=3.5,
                markevery=[1],
                label="message through Redis",
            )
        )
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.12 / _WIDTH_IN - 0.004, top - 0.3 / height_in),
        ncol=len(handles),
        frameon=False,
        fontsize=7.5,
        handlelength=1.8,
        handleheight=0.9,
        columnspacing=1.4,
        borderaxespad=0,
        borderpad=0,
    )

    fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})


def _rgb(colour: str) -> tuple[float, float, float]:
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return r, g, b


def _light(colour: str) -> bool:
    """Whether dark text reads better than white on `colour`."""
    r, g, b = _rgb(colour)
    return 0.299 * r + 0.587 * g + 0.114 * b > 0.6
