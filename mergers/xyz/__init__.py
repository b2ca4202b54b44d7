"""XYZ plot: compare merges side by side in one grid.

Three axes (X, Y, Z) vary the merge (alpha, block weights, models, calcmode,
elemental, include/exclude, adjust, dice draws, history IDs …) and the txt2img
settings (seed, prompt). The plot is planned first (``plan``: every cell's Recipe,
each distinct recipe merged once, in an order that re-merges as little as
possible), run in a session (``run``), and drawn (``grid``, ``outputs``).

Example:
    >>> spec = PlotSpec(Recipe(model_a="a", model_b="b"), x=AxisSpec("mbw alpha", "GRAD_V\\nFLAT_25"),
    ...                 y=AxisSpec("alpha", "0.3, 0.7"), z=AxisSpec("seed", "1, 2"))
    >>> plan = build_plan(spec, context_for(spec.recipe, session.host.resolve, session.history))
    >>> result = PlotRunner(session).run(plan)
    >>> save_outputs(result, plot_grids(result), grids_folder)
"""

from mergers.xyz.axes import TYPE_NAMES, AxisContext, XyzError, parse_axis
from mergers.xyz.plan import (
           AxisSpec,
           PlotOptions,
           PlotSpec,
           XyzPlan,
           build_plan,
           check_recipes,
           context_for,
           random_spec,
)
from mergers.xyz.run import PlotQueue, PlotResult, PlotRunner

__all__ = ["TYPE_NAMES", "AxisContext", "AxisSpec", "PlotOptions", "PlotQueue", "PlotResult", "PlotRunner", "PlotSpec",
           "XyzError", "XyzPlan", "build_plan", "check_recipes", "context_for", "parse_axis", "random_spec"]
