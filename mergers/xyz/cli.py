"""``python -m mergers xyz --plan plan.json``: check an XYZ plot plan, or run it where there is a generator.

The command line has no image generator (that is the web UI's txt2img), so
without ``--dry-run`` it says so; ``--dry-run`` parses every axis value, plans
every distinct merge from the model headers and prints the cells and the merges.

Example:
    $ python -m mergers xyz --plan plot.json --models ~/models --dry-run
    9 cells (3 × 3 × 1), 9 merges (6 swap only the keys whose ratio changed)
"""

from __future__ import annotations

from pathlib import Path

from mergers.errors import MergeError
from mergers.xyz.axes import TYPE_NAMES
from mergers.xyz.plan import PlotSpec, XyzPlan, build_plan, check_recipes, context_for

EPILOG = f"""\
a plan is JSON: {{"recipe": {{...the base merge, as `mergers info --json` shows a recipe...}},
  "generation": {{"prompt": "...", "seed": 1, "steps": 20, ...}},
  "x": {{"type": "mbw alpha", "values": "GRAD_V\\nFLAT_25"}}, "y": {{"type": "alpha", "values": "0.3, 0.7"}},
  "z": {{"type": "seed", "values": "1, 2"}},
  "options": {{"swap_xy": false, "save_models": false, "save_csv": false, "save_gif": false, "difference": false}}}}
axis types: {", ".join(TYPE_NAMES)}
"""


def add_command(commands) -> None:
    import argparse

    cmd = commands.add_parser("xyz", help="check (or run) an XYZ plot plan",
                              description="Parse and check an XYZ plot plan: every axis value, every cell's "
                                          "recipe, and the merges it takes.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--plan", required=True, metavar="PLAN.json", help="the plot plan (JSON)")
    cmd.add_argument("--models", metavar="DIR", default=".", help="folder holding the models (default .)")
    cmd.add_argument("--dry-run", action="store_true", help="only check the plan and print its cells and merges")
    cmd.set_defaults(run=run_xyz)


def run_xyz(args) -> int:
    from mergers.hosts.standalone import FolderHost
    from mergers.session import MergeSession

    folder = Path(args.models)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such folder")
    spec = PlotSpec.from_json(_read(Path(args.plan)))
    session = MergeSession(FolderHost(folder))
    plan = build_plan(spec, context_for(spec.recipe, session.host.resolve, session.history))
    check_recipes(plan, session.host.resolve)
    print(describe_plan(plan))
    if args.dry_run:
        return 0
    raise MergeError("the plan is valid, but the command line has no image generator to make the plot's images: "
                     "run it in the web UI's XYZ tab (or use --dry-run to check plans here)")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise MergeError(f"{path}: cannot read the plan: {error}") from None


def describe_plan(plan: XyzPlan) -> str:
    """The plan in words: the axes, the cell and merge counts, and each merge with its cells.

    Example:
        >>> print(describe_plan(plan).splitlines()[0])
        9 cells (3 × 3 × 1), 9 merges (6 swap only the keys whose ratio changed)
    """
    sizes = " × ".join(str(len(axis.values)) for axis in plan.axes)
    lines = [(f"{len(plan.cells)} cells ({sizes}), {plan.merges} merges "
              f"({plan.partial_merges} swap only the keys whose ratio changed)")]
    lines += [f"{axis.name}: {axis.type}: {' | '.join(v.label for v in axis.values)}" for axis in plan.axes if axis.active]
    for number, group in enumerate(plan.groups, start=1):
        cells = "; ".join(plan.label(plan.cells[i]) or "the one cell" for i in group)
        lines.append(f"merge {number} ({len(group)} cells): {cells}")
    return "\n".join(lines)
