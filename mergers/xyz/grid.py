"""Grid images with Pillow: cells in rows and columns, wrapped axis labels, a title band.

Cells that did not run (a stopped plot) are left blank, so a partial grid keeps
its layout. :func:`difference_image` is the "difference" view: how far a cell is
from the first, as the original's effective-elemental checker measures it.

Example:
    >>> grid = draw_grid([[img1, img2], [img3, None]], ["alpha = 0.2", "0.4"], ["GRAD_V", "FLAT_25"],
    ...                  title="a x (1-alpha) + b x alpha")
    >>> grid.size
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageOps

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
BLANK_CELL = (208, 208, 208)  # a cell that did not run
DEFAULT_CELL = (512, 512)
DIFF_THRESHOLD = 20  # the original counts channel values differing by more than 20 (cv2 threshold)
MIN_FONT = 10
LINE_GAP = 4
FONT_FILES = ("DejaVuSans.ttf", "arial.ttf", "Arial.ttf")
BREAKABLE = re.compile(r"\s*[^\s,]*,|\s*[^\s,]+")  # a word, or text up to a comma: a line may end after either


@dataclass(frozen=True)
class Fonts:
    """The label font, sized from the cell as the original sizes it ((w + h) / 25)."""

    label: ImageFont.ImageFont

    @classmethod
    def for_cell(cls, width: int, height: int) -> Fonts:
        return cls(load_font(max(MIN_FONT, (width + height) // 25)))


def load_font(size: int) -> ImageFont.ImageFont:
    """A common TrueType font (DejaVu ships with most Linux systems and A1111's Windows builds carry
    Arial), else Pillow's scalable default (Pillow ≥ 10.1; thin spaces, no "·"), else its bitmap font."""
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def wrap_text(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width``; long comma lists (block weights) break after commas.

    Example:
        >>> wrap_text("0,0.5,1,1,1,1,1,1", load_font(12), 40)
        ['0,0.5,1,', '1,1,1,1,', '1']
    """
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for piece in BREAKABLE.findall(paragraph):
            if line and measure.textlength((line + piece).strip(), font=font) > width:
                lines.append(line.strip())
                line = piece.lstrip()
            else:
                line += piece
        lines.append(line.strip())
    return lines


def text_block_height(lines: Sequence[str], font: ImageFont.ImageFont) -> int:
    return sum(_line_height(font) for _ in lines) + LINE_GAP * max(0, len(lines) - 1)


def _line_height(font: ImageFont.ImageFont) -> int:
    _, top, _, bottom = font.getbbox("Ag,|")
    return bottom - top + 2


def draw_grid(cells: Sequence[Sequence[Image.Image | None]], columns: Sequence[str], rows: Sequence[str], *,
              title: str = "", captions: Sequence[Sequence[str]] | None = None) -> Image.Image:
    """The cells (rows of images, None for a cell that did not run) with column labels on top,
    row labels on the left, ``title`` in a band above and an optional caption on each cell.

    Example:
        >>> draw_grid([[a, b]], ["0.2", "0.4"], [""]).size
        (1024, 600)
    """
    width, height = _cell_size(cells)
    fonts = Fonts.for_cell(width, height)
    column_lines = [wrap_text(text, fonts.label, width - 8) for text in columns]
    left = width * 3 // 4 if any(text.strip() for text in rows) else 0
    row_lines = [wrap_text(text, fonts.label, max(left - 8, 8)) for text in rows]
    title_lines = wrap_text(title, fonts.label, max(len(columns) * width + left - 16, 8)) if title else []
    title_band = text_block_height(title_lines, fonts.label) + 16 if title_lines else 0
    label_band = max((text_block_height(lines, fonts.label) for lines in column_lines), default=0) + 16
    grid = Image.new("RGB", (left + width * len(columns), title_band + label_band + height * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title_lines:
        _draw_lines(draw, title_lines, fonts.label, (8, 8), anchor="la")
    top = title_band + label_band
    for n, lines in enumerate(column_lines):
        _draw_centred(draw, lines, fonts.label, (left + n * width + width // 2, title_band + label_band // 2))
    for n, lines in enumerate(row_lines):
        _draw_centred(draw, lines, fonts.label, (left // 2, top + n * height + height // 2))
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            _paste_cell(grid, image, (left + c * width, top + r * height), (width, height))
            if captions and captions[r][c]:
                _caption(draw, captions[r][c], fonts.label, (left + c * width, top + (r + 1) * height), width)
    return grid


def _caption(draw: ImageDraw.ImageDraw, text: str, font, bottom_left: tuple[int, int], width: int) -> None:
    """``text`` on a white strip along the bottom of a cell."""
    lines = wrap_text(text, font, width - 8)
    x, bottom = bottom_left
    top = bottom - text_block_height(lines, font) - 8
    draw.rectangle((x, top, x + width - 1, bottom - 1), fill=BACKGROUND)
    _draw_lines(draw, lines, font, (x + width // 2, top + 4), anchor="ma")


def _cell_size(cells: Sequence[Sequence[Image.Image | None]]) -> tuple[int, int]:
    for row in cells:
        for image in row:
            if image is not None:
                return image.size
    return DEFAULT_CELL


def _paste_cell(grid: Image.Image, image: Image.Image | None, box: tuple[int, int], size: tuple[int, int]) -> None:
    if image is None:
        grid.paste(Image.new("RGB", size, BLANK_CELL), box)
        return
    if image.size != size:  # a cell generated at another size (a batch that changed it) still fits
        image = image.resize(size)
    grid.paste(image.convert("RGB"), box)


def _draw_centred(draw: ImageDraw.ImageDraw, lines: list[str], font, centre: tuple[int, int]) -> None:
    height = text_block_height(lines, font)
    _draw_lines(draw, lines, font, (centre[0], centre[1] - height // 2), anchor="ma")


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font, origin: tuple[int, int], *, anchor: str) -> None:
    x, y = origin
    for line in lines:
        draw.text((x, y), line, font=font, fill=TEXT, anchor=anchor)
        y += _line_height(font) + LINE_GAP


def difference_image(first: Image.Image, image: Image.Image) -> tuple[Image.Image, float]:
    """How far ``image`` is from ``first``: the inverted absolute difference (white = same) and the
    percentage of channel values that differ by more than 20, as the original's checker counts.

    Example:
        >>> difference_image(a, a)[1]
        0.0
    """
    base = first.convert("RGB")
    other = image.convert("RGB").resize(base.size) if image.size != base.size else image.convert("RGB")
    diff = ImageChops.difference(base, other)
    percent = 100.0 * _count_over(diff) / (diff.width * diff.height * 3)
    return ImageOps.invert(diff), percent


def _count_over(diff: Image.Image) -> int:
    """Channel values above the threshold, counted from each band's histogram."""
    return sum(sum(band.histogram()[DIFF_THRESHOLD + 1:]) for band in diff.split())
