"""``python -m mergers run RECIPE.json -o OUT.safetensors``: run a recipe file, chained or not.

A recipe file is our recipe JSON (``Recipe.to_json()``; a model slot may hold a nested
recipe object, ``more_models`` lists models past C). Model names are looked up in
``--models DIR`` when given, else beside the recipe file, else as paths. Before any
work it prints the estimate (bytes, peak RAM/VRAM, time) from the inputs' headers;
``--estimate`` stops there.

Example:
    $ python -m mergers run chain.recipe.json --models ~/models -o out.safetensors
    estimate: reads 8.53 GB, writes 2.13 GB; peak RAM ≈ 0.45 GB; ≈ 27 s at 400 MB/s
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mergers.chain import describe, load_recipe_file
from mergers.errors import CheckpointError, MergeError
from mergers.estimate import DEFAULT_DISK_BYTES_PER_S, estimate
from mergers.licenses import license_lines, terms_of_sources
from mergers.merge import merge_to_file, open_sources, resolve_path
from mergers.models import find_model
from mergers.writer import OUTPUT_DTYPES


def add_command(commands) -> None:
    cmd = commands.add_parser("run", help="run a recipe JSON file (chained recipes and N models included)",
                              description="Merge what RECIPE (a supermerger recipe JSON file) describes into "
                                          "OUT; nested recipes are merged key by key in the same pass.")
    cmd.add_argument("recipe", metavar="RECIPE.json")
    cmd.add_argument("-o", "--output", metavar="OUT.safetensors", help="the file to write (not needed with --estimate)")
    cmd.add_argument("--models", metavar="DIR", help="folder holding the input models (default: beside RECIPE, or paths)")
    cmd.add_argument("--dtype", choices=list(OUTPUT_DTYPES), help="output precision (overrides the recipe's)")
    cmd.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    cmd.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    cmd.add_argument("--allow-non-finite", action="store_true",
                     help="write OUT even when a merged key holds NaN or Inf (default: refuse, naming the key)")
    cmd.add_argument("--estimate", action="store_true", help="print the estimate and stop")
    cmd.add_argument("--disk-speed", type=float, default=DEFAULT_DISK_BYTES_PER_S / 1e6, metavar="MB/s",
                     help=f"disk speed the time estimate assumes (default {DEFAULT_DISK_BYTES_PER_S / 1e6:.0f})")
    cmd.set_defaults(run=run_recipe_file)


def run_recipe_file(args) -> int:
    path = Path(args.recipe)
    recipe = load_recipe_file(path)
    if args.dtype:
        recipe = recipe.with_changes(dtype=args.dtype)
    resolve = recipe_resolver(path, Path(args.models) if args.models else None)
    print(f"recipe: {describe(recipe)}")
    with open_sources(recipe, resolve, device=args.device) as sources:
        print(estimate(recipe, sources, device=args.device, disk_bytes_per_s=args.disk_speed * 1e6).text())
        print("\n".join(license_lines(terms_of_sources(sources))))
    if args.estimate:
        return 0
    if not args.output:
        raise MergeError("run needs -o OUT.safetensors (or --estimate)")
    with tqdm(total=0, unit="key", desc="merging", disable=None) as bar:
        def progress(done: int, total: int, key: str) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = merge_to_file(recipe, args.output, resolve=resolve, device=args.device,
                               overwrite=args.overwrite, on_progress=progress,
                               allow_non_finite=args.allow_non_finite)
    print(f"{result.plan.count('merge')} keys merged, {len(result.plan.steps) - result.plan.count('merge')} "
          f"copied; wrote {result.path} in {result.seconds:.1f} s")
    for warning in result.warnings:
        print(f"warning: {warning}")
    return 0


def recipe_resolver(recipe_file: Path, models: Path | None):
    """Names in a recipe file: in ``models`` (by name, checked by hash when known), else beside the
    file, else as a path.

    Example:
        >>> recipe_resolver(Path("r/chain.json"), None)("a.safetensors")
        PosixPath('r/a.safetensors')
    """
    def resolve(name: str) -> Path:
        if models is not None:
            return find_model(name, models)
        beside = recipe_file.parent / name
        if beside.is_file():
            return beside
        try:
            return resolve_path(name)
        except CheckpointError:
            raise CheckpointError(f"model {name!r} (named in {recipe_file.name}) is neither beside it nor "
                                  "a path; give the folder with --models") from None
    return resolve
