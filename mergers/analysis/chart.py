"""Pictures of a comparison, drawn with Pillow: one bar per block, or a blocks × statistics heatmap.

The CLI's ``--plot`` and the tab's image come from :func:`render_chart`, so both show the same
picture. The value axis spans the data (with round ticks), not 0…1: blocks of two related models
differ in the third decimal of their cosine, and a 0…1 axis would hide it. Chart text is ASCII:
the bitmap font of the Pillow that A1111 pins (9.5) has no other characters.

Example:
    >>> image = render_chart(compare_models("a.safetensors", "b.safetensors"), "cosine")
    >>> image.save("ab.png")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

CHARTS = ("bars", "heatmap")
LABELS = {
    "cosine": "cosine similarity (mean of keys)", "cosine_min": "cosine similarity (lowest key)",
    "cosine_attn2": "cosine similarity of attn2.to_out", "relative_l2": "relative L2 distance |A-B| / max(|A|, |B|)",
    "norm_a": "L2 norm of A", "norm_b": "L2 norm of B",
    "coefficient": "share of B in the merge (least-squares t of M-A on B-A)",
    "alignment": "cos(M-A, B-A): 1 = on the line from A to B",
}
# A perceptually ordered dark-blue → teal → yellow ramp (viridis-like stops), low → high.
RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
BACKGROUND, INK, GRID, MISSING = (255, 255, 255), (30, 30, 30), (220, 220, 220), (200, 200, 200)
FONT_SIZE, TITLE_SIZE = 13, 15
SLOT, MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, PLOT_HEIGHT, MARGIN_BOTTOM = 50, 72, 16, 48, 300, 64
CELL_HEIGHT, ROW_LABEL_WIDTH = 30, 110
TICKS = 5  # about this many value-axis ticks


def render_chart(comparison, statistic: str = "cosine", kind: str = "bars") -> Image.Image:
    """The chart of a comparison's block rows: ``kind`` "bars" (of ``statistic``) or "heatmap".

    Example:
        >>> render_chart(result, "relative_l2").size
        (1284, 412)
    """
    if kind not in CHARTS:
        raise ValueError(f"unknown chart {kind!r}; use one of {', '.join(CHARTS)}")
    title = f"{comparison.model_a} vs {comparison.model_b}"
    if comparison.model_merged:
        title = f"{comparison.model_merged}: merge of {title.replace(' vs ', ' and ')}"
    if kind == "heatmap":
        return draw_heatmap(comparison.blocks, comparison.statistics, title=title)
    return draw_bars(comparison.blocks, statistic, title=f"{title}: {LABELS.get(statistic, statistic)}")


def draw_bars(rows: Sequence[Mapping[str, Any]], statistic: str, *, title: str = "") -> Image.Image:
    """One bar per row (``row["name"]`` under it, the value over it), coloured by value.

    Example:
        >>> draw_bars([{"name": "IN00", "cosine": 0.98}, {"name": "IN01", "cosine": 0.99}], "cosine").size
        (180, 412)
    """
    values = [_number(row.get(statistic)) for row in rows]
    low, high, step = axis_range([v for v in values if v is not None])
    width = MARGIN_LEFT + SLOT * max(len(rows), 1) + MARGIN_RIGHT
    image = Image.new("RGB", (width, MARGIN_TOP + PLOT_HEIGHT + MARGIN_BOTTOM), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small, title_font = _font(FONT_SIZE), _font(FONT_SIZE - 2), _font(TITLE_SIZE)
    draw.text((8, 12), title, fill=INK, font=title_font)

    def y_of(value: float) -> float:
        return MARGIN_TOP + PLOT_HEIGHT * (high - value) / (high - low)

    _value_axis(draw, low, high, step, y_of, width, font)
    base = y_of(min(max(0.0, low), high))  # bars grow from 0 when the axis holds it, else from its foot
    for index, (row, value) in enumerate(zip(rows, values)):
        left = MARGIN_LEFT + SLOT * index
        centre = left + SLOT / 2
        _centred(draw, centre, MARGIN_TOP + PLOT_HEIGHT + 8, str(row.get("name", "")), font)
        if value is None:
            _centred(draw, centre, base - 18, "-", font)
            continue
        top, bottom = sorted((y_of(value), base))
        colour = ramp_colour((value - low) / (high - low))
        draw.rectangle((left + 6, top, left + SLOT - 6, max(bottom, top + 1)), fill=colour)
        below = y_of(value) > base  # a negative bar: its value goes under its end
        _centred(draw, centre, bottom + 2 if below else top - 14, short_number(value), small)
    return image


def draw_heatmap(rows: Sequence[Mapping[str, Any]], statistics: Sequence[str], *, title: str = "") -> Image.Image:
    """Rows as columns, statistics as lines; each line coloured over its own range, values printed.

    Example:
        >>> draw_heatmap(result.blocks, ("cosine", "relative_l2")).size
    """
    width = ROW_LABEL_WIDTH + SLOT * max(len(rows), 1) + MARGIN_RIGHT
    height = MARGIN_TOP + CELL_HEIGHT * len(statistics) + 28
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(FONT_SIZE - 2)
    draw.text((8, 12), title, fill=INK, font=_font(TITLE_SIZE))
    for line, statistic in enumerate(statistics):
        top = MARGIN_TOP + CELL_HEIGHT * line
        draw.text((8, top + 8), statistic, fill=INK, font=font)
        _heatmap_line(draw, [_number(row.get(statistic)) for row in rows], top, font)
    for index, row in enumerate(rows):
        _centred(draw, ROW_LABEL_WIDTH + SLOT * index + SLOT / 2, height - 22, str(row.get("name", "")), font)
    return image


def _heatmap_line(draw: ImageDraw.ImageDraw, values: list[float | None], top: int, font) -> None:
    present = [v for v in values if v is not None]
    low, high = (min(present), max(present)) if present else (0.0, 1.0)
    for index, value in enumerate(values):
        left = ROW_LABEL_WIDTH + SLOT * index
        fraction = 0.5 if high == low or value is None else (value - low) / (high - low)
        colour = MISSING if value is None else ramp_colour(fraction)
        draw.rectangle((left, top, left + SLOT - 1, top + CELL_HEIGHT - 1), fill=colour)
        text_colour = INK if value is None or fraction > 0.55 else BACKGROUND  # readable on dark cells
        _centred(draw, left + SLOT / 2, top + 8, "-" if value is None else short_number(value), font, text_colour)


def axis_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(low, high, step) of a value axis with round ticks that holds ``values``.

    Example:
        >>> axis_range([0.981, 0.999])
        (0.98, 1.0, 0.005)
    """
    if not values:
        return 0.0, 1.0, 0.2
    low, high = min(values), max(values)
    if high - low < 1e-9:  # one value (or all equal): give it some room
        pad = abs(high) * 0.01 or 0.5
        low, high = low - pad, high + pad
    step = nice_step((high - low) / TICKS)
    bottom, top = math.floor(low / step) * step, math.ceil(high / step) * step
    if bottom == low and low != 0:  # keep the lowest bar visible above the axis foot
        bottom -= step
    return bottom, top, step


def nice_step(raw: float) -> float:
    """The round step (1, 2 or 5 × 10ⁿ) at or above ``raw``.

    Example:
        >>> nice_step(0.0036)
        0.005
    """
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw * (1 - 1e-9):
            return factor * power
    return 10 * power


def ramp_colour(fraction: float) -> tuple[int, int, int]:
    """The colour at ``fraction`` (0…1, clamped) along :data:`RAMP`.

    Example:
        >>> ramp_colour(0.0)
        (68, 1, 84)
    """
    position = min(max(fraction, 0.0), 1.0) * (len(RAMP) - 1)
    index = min(int(position), len(RAMP) - 2)
    mix = position - index
    start, end = RAMP[index], RAMP[index + 1]
    return tuple(round(s + (e - s) * mix) for s, e in zip(start, end))


def short_number(value: float) -> str:
    """A value in at most 6 characters, enough to tell blocks apart: 0.9987, 12.3, 1.2e+03.

    Example:
        >>> short_number(0.998712)
        '0.9987'
    """
    magnitude = abs(value)
    if magnitude >= 1000 or (0 < magnitude < 0.001):
        return f"{value:.1e}"
    decimals = 4 if magnitude < 10 else 1
    return f"{value:.{decimals}f}"


def _value_axis(draw: ImageDraw.ImageDraw, low: float, high: float, step: float, y_of, width: int, font) -> None:
    count = round((high - low) / step)
    for tick in range(count + 1):
        value = low + tick * step
        y = y_of(value)
        draw.line((MARGIN_LEFT, y, width - MARGIN_RIGHT, y), fill=GRID)
        label = f"{value:.{_tick_decimals(step)}f}"
        draw.text((MARGIN_LEFT - 6 - _text_width(draw, label, font), y - 7), label, fill=INK, font=font)


def _tick_decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step) + 1e-9))


def _centred(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, font, fill=INK) -> None:
    draw.text((x - _text_width(draw, text, font) / 2, y), text, fill=fill, font=font)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _font(size: int):
    """Pillow's own scalable font; Pillow < 10.1 (A1111 pins 9.5) has only a small bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()
