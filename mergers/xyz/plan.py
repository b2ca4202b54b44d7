"""An XYZ plot as a plan: every cell's recipe and txt2img settings, and the order to merge them in.

A :class:`PlotSpec` is what the user typed (a base recipe, base txt2img settings,
three axes, options); it is JSON, so ``python -m mergers xyz --plan plan.json``
reads the same thing the tab builds. :func:`build_plan` parses every axis value
and builds every cell's Recipe before anything runs.

Each distinct recipe is merged once: cells that share it (along a seed or prompt
axis, say) are generated one after another on that merge. The merges are ordered
so that each follows the one it differs least from; when two consecutive recipes
differ only in ratios (an mbw or alpha axis), the runner re-merges and swaps only
the keys whose ratio changed (``MergeSession.merge(only_changed=True)``).

Example:
    >>> spec = PlotSpec(Recipe(model_a="a", model_b="b"), GenerationParams(seed=7),
    ...                 x=AxisSpec("alpha", "0.2, 0.8"), y=AxisSpec("seed", "1, 2"))
    >>> plan = build_plan(spec, AxisContext())
    >>> len(plan.cells), plan.merges
    (4, 2)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mergers.arch import detect_architecture
from mergers.checkpoint import open_checkpoint
from mergers.errors import MergeError, RecipeError
from mergers.host import GenerationParams
from mergers.merge import open_sources
from mergers.plan import plan_merge
from mergers.recipe import Recipe
from mergers.session import same_but_ratios
from mergers.xyz.axes import (
    AXIS_NAMES,
    FRESH_SEED_BOUND,
    NONE,
    Axis,
    AxisContext,
    Draft,
    XyzError,
    apply_value,
    check_axes,
    finish_draft,
    parse_axis,
)

PLAN_FORMAT = "supermerger-xyz"
PLAN_VERSION = 1
RANDOM_COLUMNS = 10  # "Run Rand": more than 10 draws wrap into rows of 10, as the original


@dataclass(frozen=True)
class AxisSpec:
    """An axis as typed: its type (the original's label) and its values' text."""

    type: str = NONE
    values: str = ""


@dataclass(frozen=True)
class PlotOptions:
    """The original's XYZ settings (swap XY, save model, save csv, save anime gif) plus the difference view."""

    swap_xy: bool = False
    save_models: bool = False
    save_csv: bool = False
    save_gif: bool = False
    difference: bool = False
    restore: bool = False  # after the plot, the checkpoint's own weights go back (not the last cell's merge)


@dataclass(frozen=True)
class PlotSpec:
    """What to plot: the base merge and txt2img settings, and the axes that vary them."""

    recipe: Recipe
    generation: GenerationParams = field(default_factory=GenerationParams)
    x: AxisSpec = field(default_factory=AxisSpec)
    y: AxisSpec = field(default_factory=AxisSpec)
    z: AxisSpec = field(default_factory=AxisSpec)
    options: PlotOptions = field(default_factory=PlotOptions)
    columns: int | None = None  # wrap a lone X axis into rows of this many (Run Rand)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "recipe": self.recipe.to_dict(),
                "generation": dataclasses.asdict(self.generation),
                **{name: dataclasses.asdict(getattr(self, name)) for name in ("x", "y", "z")},
                "options": dataclasses.asdict(self.options), "columns": self.columns}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_dict(cls, data: Any) -> PlotSpec:
        """Read a plot plan (``to_dict`` output or a hand-written one); errors name the field."""
        if not isinstance(data, dict):
            raise XyzError(f"a plot plan must be a JSON object, not {type(data).__name__}")
        version = data.get("version", PLAN_VERSION)
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise XyzError(f"plot plan version {version!r} is newer than this supermerger understands")
        unknown = set(data) - {"format", "version", "recipe", "generation", "x", "y", "z", "options", "columns"}
        if unknown:
            raise XyzError(f"unknown plot plan field(s): {', '.join(sorted(unknown))}")
        if "recipe" not in data:
            raise XyzError("the plot plan has no 'recipe' (the base merge)")
        return cls(Recipe.from_dict(data["recipe"]), _typed(GenerationParams, data.get("generation", {}), "generation"),
                   *(_typed(AxisSpec, data.get(name, {}), name) for name in ("x", "y", "z")),
                   _typed(PlotOptions, data.get("options", {}), "options"), data.get("columns"))

    @classmethod
    def from_json(cls, text: str) -> PlotSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise XyzError(f"the plot plan is not valid JSON: {error}") from None


def _typed(kind: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise XyzError(f"plot plan field {where!r} must be a JSON object")
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise XyzError(f"plot plan field {where!r}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        return kind(**data)
    except TypeError as error:
        raise XyzError(f"plot plan field {where!r}: {error}") from None


@dataclass(frozen=True)
class Cell:
    """One image of the plot: where it sits, what is merged and what is generated."""

    index: int  # position in grid order: z, then y, then x
    x: int
    y: int
    z: int
    recipe: Recipe
    params: GenerationParams

    @property
    def position(self) -> tuple[int, int, int]:
        return self.x, self.y, self.z


@dataclass(frozen=True)
class XyzPlan:
    """Every cell, and the merges: groups of cells sharing a recipe, in the order they run."""

    spec: PlotSpec
    axes: tuple[Axis, Axis, Axis]
    cells: tuple[Cell, ...]
    groups: tuple[tuple[int, ...], ...]  # cell indices per merge, in merge order

    @property
    def merges(self) -> int:
        return len(self.groups)

    @property
    def partial_merges(self) -> int:
        """Merges that follow one differing from them only in ratios (only changed keys are swapped)."""
        recipes = [self.cells[group[0]].recipe for group in self.groups]
        return sum(same_but_ratios(before, after) for before, after in itertools.pairwise(recipes))

    def run_order(self) -> Iterator[Cell]:
        for group in self.groups:
            for index in group:
                yield self.cells[index]

    def label(self, cell: Cell) -> str:
        """The cell's axis values, e.g. "X = GRAD_V, Y = 0.3"."""
        parts = [f"{axis.name} = {axis.values[n].label}" for axis, n in zip(self.axes, cell.position) if axis.active]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The spec, with every cell's recipe and settings (axis values such as seed -1 are resolved)."""
        return {**self.spec.to_dict(), "cells": [
            {"x": c.x, "y": c.y, "z": c.z, "recipe": c.recipe.to_dict(), "generation": dataclasses.asdict(c.params)}
            for c in self.cells]}


def build_plan(spec: PlotSpec, ctx: AxisContext) -> XyzPlan:
    """Parse the axes and build every cell's Recipe; an XyzError names the axis or cell at fault.

    Example:
        >>> build_plan(spec, context_for(spec.recipe, session.host.resolve, session.history)).merges
        9
    """
    axes = tuple(parse_axis(name, axis.type, axis.values, ctx)
                 for name, axis in zip(AXIS_NAMES, (spec.x, spec.y, spec.z)))
    check_axes(axes, dice_mode=spec.recipe.dice.mode)
    generation = _fixed_seed(spec.generation)
    cells = tuple(_cell(n, position, axes, spec.recipe, generation, ctx)
                  for n, position in enumerate(_positions(axes)))
    return XyzPlan(spec, axes, cells, merge_order(cells))


def context_for(recipe: Recipe, resolve: Callable[[str], Path] | None = None, history=None) -> AxisContext:
    """An AxisContext whose layout is model A's (read from its header; SD1 when it cannot be resolved).

    Example:
        >>> context_for(recipe, host.resolve, session.history).layout
        'sdxl'
    """
    layout = "sd1"
    if resolve is not None:
        with open_checkpoint(resolve(recipe.model_a)) as ckpt:
            layout = detect_architecture(ckpt.shapes, ckpt.metadata, source=ckpt.name).layout
    return AxisContext(layout, resolve, history)


def _fixed_seed(params: GenerationParams) -> GenerationParams:
    """Seed -1 is drawn once for the whole plot, so cells differ only by their axes (as the original)."""
    if params.seed != -1:
        return params
    return dataclasses.replace(params, seed=random.randrange(FRESH_SEED_BOUND))


def _positions(axes: tuple[Axis, ...]) -> Iterator[tuple[int, int, int]]:
    x_axis, y_axis, z_axis = axes
    for z in range(len(z_axis.values)):
        for y in range(len(y_axis.values)):
            for x in range(len(x_axis.values)):
                yield x, y, z


def _cell(index: int, position: tuple[int, int, int], axes: tuple[Axis, ...], recipe: Recipe,
          generation: GenerationParams, ctx: AxisContext) -> Cell:
    types = frozenset(axis.type for axis in axes)
    draft = Draft(_recipe_fields(recipe), dataclasses.asdict(generation), types)
    # "merge ID" replaces the whole recipe, so it goes first; then Z, Y, X as the original.
    ordered = sorted(zip(axes, position), key=lambda pair: (pair[0].type != "merge ID", -AXIS_NAMES.index(pair[0].name)))
    for axis, n in ordered:
        apply_value(draft, axis, axis.values[n])
    where = ", ".join(f"{axis.name} = {axis.values[n].label}" for axis, n in zip(axes, position) if axis.active)
    try:
        finish_draft(draft, ctx.layout)
        built = Recipe.from_dict(draft.recipe)
        params = GenerationParams(**draft.generation)
    except (MergeError, ValueError) as error:
        raise XyzError(f"cell {where}: {error}") from None
    return Cell(index, *position, built, params)


def _recipe_fields(recipe: Recipe) -> dict[str, Any]:
    data = recipe.to_dict()
    data.pop("format"), data.pop("version")
    return data


def merge_order(cells: tuple[Cell, ...]) -> tuple[tuple[int, ...], ...]:
    """Cells grouped by recipe (one merge each), each group after the one it differs least from.

    Example:
        >>> merge_order(plan.cells)
        ((0, 3, 6), (1, 4, 7), (2, 5, 8))
    """
    groups: dict[Recipe, list[int]] = {}
    for cell in cells:
        groups.setdefault(cell.recipe, []).append(cell.index)
    remaining = list(groups)  # first-appearance order breaks ties
    ordered = [remaining.pop(0)]
    while remaining:
        nearest = min(remaining, key=lambda recipe: recipe_distance(ordered[-1], recipe))
        remaining.remove(nearest)
        ordered.append(nearest)
    return tuple(tuple(groups[recipe]) for recipe in ordered)


def recipe_distance(a: Recipe, b: Recipe) -> int:
    """0 for the same recipe, 1 when only ratios differ (a partial re-merge), else 2 + fields that differ."""
    if a == b:
        return 0
    if same_but_ratios(a, b):
        return 1
    return 2 + sum(getattr(a, f.name) != getattr(b, f.name) for f in fields(Recipe))


def check_recipes(plan: XyzPlan, resolve: Callable[[str], Path]) -> None:
    """Plan every distinct merge from the model headers (no tensor is read), so a recipe that
    cannot run fails now, naming its cell, not half way through the plot."""
    for group in plan.groups:
        cell = plan.cells[group[0]]
        try:
            with open_sources(cell.recipe, resolve) as sources:
                plan_merge(cell.recipe, sources)
        except (MergeError, RecipeError) as error:
            raise XyzError(f"cell {plan.label(cell) or 1}: {error}") from None


def random_spec(recipe: Recipe, generation: GenerationParams, draws: int,
                options: PlotOptions | None = None) -> PlotSpec:
    """"Run Rand": ``draws`` dice draws as one grid, wrapped into rows of 10 past 10 draws.

    Example:
        >>> random_spec(recipe.with_changes(dice=Dice(mode="R")), GenerationParams(), 25).columns
        10
    """
    if recipe.dice.mode == "off":
        raise XyzError("Run Rand draws the dice: choose a Random Mode other than off")
    columns = RANDOM_COLUMNS if draws > RANDOM_COLUMNS else None
    return PlotSpec(recipe, generation, x=AxisSpec("random", str(draws)), options=options or PlotOptions(),
                    columns=columns)
