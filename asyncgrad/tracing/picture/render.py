"""The picture: a `Scene` drawn with matplotlib (imported inside `render`, without pyplot),
and the sizes and colours it is drawn in."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncgrad.tracing.picture.scene import PAD, Scene

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.font_manager import FontProperties


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
STUCK = "#b2182b"  # unfinished spans' outline, and what an empty band says
_ARROW = "#303030"

_WIDTH_IN = 12.0
_DPI = 150
_MAX_BANDS_IN = 13.0  # the bands' height at most (rows get thinner beyond)
_ROW_IN = 0.19  # a sub-row's height at most
_BAR = 0.78  # of a sub-row, what a bar fills
_MAX_LABELS = 4000


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


def render(scene: Scene, path: str | os.PathLike[str], title: str | None) -> None:
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
    name_fs = min(9.0, max(4.5, (1 + 2 * PAD) * row_pt * 0.55))
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
        below = min(PAD * row_pt, max(band_pt - block, 0.0) / 2)
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
                why, colour = "no spans" + (f": {b.note}" if b.note else ""), STUCK
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
                edgecolors=STUCK,
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
        color=STUCK if scene.unfinished else "#555555",
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
                edgecolor=STUCK,
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
