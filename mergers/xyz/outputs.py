"""What a finished (or stopped) plot leaves: grid images per Z value, and the optional files.

Grids are PNGs whose info holds the plan (``supermerger-xyz``: the spec, and every
cell's recipe as run) and the first cell's infotext (``parameters``, which A1111's
PNG Info tab reads). Options add a "difference" grid (each cell against the first),
a CSV of the cells and an animated GIF of them.

Example:
    >>> grids = plot_grids(result)
    >>> paths = save_outputs(result, grids, Path("outputs/txt2img-grids"))
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mergers.errors import OutputError
from mergers.methods import method_for
from mergers.ui.fields import short_model_name
from mergers.xyz.grid import difference_image, draw_grid
from mergers.xyz.plan import Cell, XyzPlan
from mergers.xyz.run import PlotResult

PLAN_INFO_KEY = "supermerger-xyz"
GIF_FRAME_MS = 1000  # the original's difference GIFs show each frame for a second
MODEL_ROLE = re.compile(r"\b[ABC]\b")  # the models in a method's formula
# Pillow's fallback font has no "·", "−", "α", "β": the title is written with plain letters.
ASCII_FORMULA = str.maketrans({"·": " x ", "−": "-", "α": "alpha", "β": "beta"})
CSV_HEADER = ("cell", "X", "Y", "Z", "prompt", "seed", "merge", "history ID", "difference %", "recipe")


@dataclass(frozen=True)
class GridImage:
    """One grid: the Z value it shows (blank without a Z axis) and whether it is the difference view."""

    image: Image.Image
    z_label: str
    difference: bool = False


def plot_grids(result: PlotResult) -> list[GridImage]:
    """One grid per Z value (cells that did not run left blank), then the difference grids if asked.

    Example:
        >>> [g.z_label for g in plot_grids(result)]
        ['seed = 1', 'seed = 2']
    """
    plan = result.plan
    title = plot_title(plan)
    grids = [GridImage(_grid(result, z, title), _z_label(plan, z)) for z in range(len(plan.axes[2].values))]
    if plan.spec.options.difference:
        percents = differences(result)
        grids += [GridImage(_grid(result, z, f"difference from the first cell; {title}", percents), _z_label(plan, z),
                            difference=True) for z in range(len(plan.axes[2].values))]
    return grids


def differences(result: PlotResult) -> dict[int, tuple[Image.Image, float]]:
    """Cell index → (difference image, % of channel values that differ) against the first cell made."""
    made = sorted(result.cells)
    if not made:
        return {}
    first = result.cells[made[0]].image
    return {index: difference_image(first, result.cells[index].image) for index in made}


def _z_label(plan: XyzPlan, z: int) -> str:
    axis = plan.axes[2]
    return f"{axis.type} = {axis.values[z].label}" if axis.active else ""


def _grid(result: PlotResult, z: int, title: str,
          percents: dict[int, tuple[Image.Image, float]] | None = None) -> Image.Image:
    plan = result.plan
    rows = _layout(plan, [c for c in plan.cells if c.z == z])
    images = [[_image(result, cell, percents) for cell in row] for row in rows]
    captions = [[_caption(cell, percents) for cell in row] for row in rows] if percents is not None else None
    columns, row_labels = _labels(plan, rows)
    z_text = _z_label(plan, z)
    return draw_grid(images, columns, row_labels, title=f"{title}\n{z_text}".strip(), captions=captions)


def _layout(plan: XyzPlan, cells: list[Cell]) -> list[list[Cell | None]]:
    """Rows of cells: Y down, X across; swapped with "swap X/Y"; a lone X wrapped into ``columns``."""
    width = len(plan.axes[0].values)
    rows: list[list[Cell | None]] = [cells[i: i + width] for i in range(0, len(cells), width)]
    if plan.spec.columns and not plan.axes[1].active and width > plan.spec.columns:
        flat, step = rows[0], plan.spec.columns
        rows = [flat[i: i + step] for i in range(0, len(flat), step)]
        rows[-1] = rows[-1] + [None] * (step - len(rows[-1]))
    if plan.spec.options.swap_xy:
        rows = [list(column) for column in zip(*rows)]
    return rows


def _labels(plan: XyzPlan, rows: list[list[Cell | None]]) -> tuple[list[str], list[str]]:
    x_axis, y_axis = plan.axes[0], plan.axes[1]
    if plan.spec.columns and not y_axis.active and len(rows) > 1:  # Run Rand: draws numbered
        step = len(rows[0])
        return [str(n) for n in range(1, step + 1)], [f"draw {n * step + 1}–{n * step + step}" for n in range(len(rows))]
    columns = _axis_labels(x_axis)
    row_labels = _axis_labels(y_axis) if y_axis.active else [""]
    return (row_labels, columns) if plan.spec.options.swap_xy else (columns, row_labels)


def _axis_labels(axis) -> list[str]:
    labels = [value.label for value in axis.values]
    labels[0] = f"{axis.type} = {labels[0]}"  # the original names the axis on its first label
    return labels


def _image(result: PlotResult, cell: Cell | None, percents) -> Image.Image | None:
    if cell is None or cell.index not in result.cells:
        return None
    if percents is not None:
        return percents[cell.index][0]
    return result.cells[cell.index].image


def _caption(cell: Cell | None, percents: dict[int, tuple[Image.Image, float]]) -> str:
    if cell is None or cell.index not in percents:
        return ""
    return f"Diff: {percents[cell.index][1]:.3f}%"


def plot_title(plan: XyzPlan) -> str:
    """The merge the plot varies, with the axes' fields shown as X/Y/Z (the original's top-left legend)."""
    recipe = plan.spec.recipe
    method = method_for(recipe.mode, recipe.calcmode)
    names = {"A": short_model_name(recipe.model_a), "B": short_model_name(recipe.model_b),
             "C": short_model_name(recipe.model_c) if recipe.model_c else "C"}
    formula = MODEL_ROLE.sub(lambda match: names[match.group(0)], method.formula).translate(ASCII_FORMULA)
    axes = ", ".join(f"{axis.name}: {axis.type}" for axis in plan.axes if axis.active)
    calc = f" [{recipe.calcmode}]" if recipe.calcmode != "normal" else ""
    return f"{method.label}{calc}: {formula}; {axes}"


def plan_info(result: PlotResult) -> str:
    """The plan as JSON for the PNG info: the spec, every cell's settings, and the recipe each ran with."""
    data = result.plan.to_dict()
    for cell, entry in zip(result.plan.cells, data["cells"]):
        made = result.cells.get(cell.index)
        entry["made"] = made is not None
        if made is not None and made.recipe is not None:
            entry["recipe"] = made.recipe.to_dict()  # as run: dice drawn, seeds fixed
            entry["history_id"] = made.history_id
    return json.dumps(data, ensure_ascii=False)


def save_outputs(result: PlotResult, grids: list[GridImage], folder: Path) -> list[Path]:
    """Write the grids (PNG with the plan in its info), and the CSV and GIF when asked; returns the files.

    Example:
        >>> save_outputs(result, plot_grids(result), Path("grids"))
        [PosixPath('grids/xyz_grid-20240101-120000-1.png')]
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{folder}: cannot create the grids folder: {error}") from None
    stem = f"xyz_grid-{time.strftime('%Y%m%d-%H%M%S')}"
    info = _png_info(result)
    paths = [_save_png(grid.image, _free_path(folder, f"{stem}-{'diff-' if grid.difference else ''}{n}", ".png"), info)
             for n, grid in enumerate(grids, start=1)]
    options = result.plan.spec.options
    if options.save_csv:
        paths.append(write_csv(result, _free_path(folder, stem, ".csv")))
    if options.save_gif and result.cells:
        paths.append(write_gif(result, _free_path(folder, stem, ".gif")))
    return paths


def _png_info(result: PlotResult) -> PngInfo:
    info = PngInfo()
    first = next((result.cells[i] for i in sorted(result.cells)), None)
    if first is not None:
        info.add_text("parameters", first.infotext)
    info.add_text(PLAN_INFO_KEY, plan_info(result))
    return info


def _save_png(image: Image.Image, path: Path, info: PngInfo) -> Path:
    try:
        image.save(path, pnginfo=info)
    except OSError as error:
        raise OutputError(f"{path}: cannot write the grid: {error}") from None
    return path


def _free_path(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem+suffix``, numbered when taken (two plots in one second)."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        path, n = folder / f"{stem}_{n}{suffix}", n + 1
    return path


def write_csv(result: PlotResult, path: Path) -> Path:
    """One row per cell: its axis values, prompt, seed, merge, history ID, difference and recipe as run."""
    plan = result.plan
    percents = differences(result)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_HEADER)
        for cell in plan.cells:
            writer.writerow(_csv_row(plan, cell, result, percents))
    return path


def _csv_row(plan: XyzPlan, cell: Cell, result: PlotResult, percents) -> list:
    made = result.cells.get(cell.index)
    labels = [axis.values[n].label if axis.active else "" for axis, n in zip(plan.axes, cell.position)]
    recipe = made.recipe if made is not None and made.recipe is not None else cell.recipe
    percent = f"{percents[cell.index][1]:.3f}" if cell.index in percents else ""
    return [cell.index + 1, *labels, cell.params.prompt, cell.params.seed, made.merge_name if made else "not made",
            made.history_id if made else "", percent, json.dumps(asdict(recipe), ensure_ascii=False, default=str)]


def write_gif(result: PlotResult, path: Path) -> Path:
    """The cells made, in grid order, as an animated GIF (a second a frame, looping)."""
    frames = [result.cells[i].image.convert("RGB") for i in sorted(result.cells)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return path
