"""The command line: ``python -m mergers merge|info|recipe|demo``.

Run ``python -m mergers COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mergers.arch import detect_architecture, layout_named
from mergers.checkpoint import open_checkpoint
from mergers.demo import ensure_demo_models
from mergers.dice import Dice
from mergers.errors import MergeError
from mergers.fileio import ensure_utf8_console
from mergers.estimate import estimate
from mergers.interop import describe_stored_recipes, file_dtype_of, rerunnable
from mergers.licenses import combine_terms, license_lines, made_from_lines, read_input_terms, terms_of_sources
from mergers.merge import merge_to_file, open_sources, resolve_path
from mergers.plan import missing_message
from mergers.metadata import A1111_RECIPE_KEY, stored_recipe
from mergers.methods import CALCMODES, MODES
from mergers.models import find_model
from mergers.recipe import Recipe
from mergers.writer import OUTPUT_DTYPES

log = logging.getLogger("mergers")

EPILOG = """\
block weights (--weights-alpha/--weights-beta) take any of:
  26 numbers (SD1/SD2: BASE,IN00..IN11,M00,OUT00..OUT11) or 20 (SDXL: BASE,IN00..IN08,M00,OUT00..OUT08);
  a preset name such as GRAD_V or FLAT_25 (26 values are converted for SDXL as the original does);
  a readable form such as "BASE:0, IN00-IN05:0.3, OUT:1" (later entries win; ALL:x sets a default).
When block weights are given they decide every key, BASE included; --alpha/--beta are then unused.
"""


# Commands that live beside their feature: each module has ``add_command(commands)``.
COMMAND_MODULES: tuple[str, ...] = ("mergers.run_cli", "mergers.xyz.cli", "mergers.lora.cli", "mergers.analysis_cli",
                                    "mergers.selftest")


def program_name() -> str:
    """How the user ran us: the ``supermerger`` command (pip's console script) or ``python -m mergers``."""
    return "supermerger" if Path(sys.argv[0]).stem == "supermerger" else "python -m mergers"


def build_parser(command_modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description="Merge Stable Diffusion checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens, key by key")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_merge(commands)
    _add_info(commands)
    _add_recipe(commands)
    _add_demo(commands)
    _add_ui(commands)
    for module in dict.fromkeys(command_modules):  # in order, once each
        importlib.import_module(module).add_command(commands)
    return parser


def _add_merge(commands) -> None:
    cmd = commands.add_parser("merge", help="merge two or three checkpoints into a new file",
                              description="Merge MODEL_A with MODEL_B (and MODEL_C) into OUT.safetensors.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("model_a", metavar="MODEL_A")
    cmd.add_argument("model_b", metavar="MODEL_B")
    cmd.add_argument("model_c", metavar="MODEL_C", nargs="?")
    cmd.add_argument("--mode", default="weight_sum",
                     help=f"merge mode: {', '.join(repr(v) for v in MODES.values())} or snake_case (default weight_sum)")
    cmd.add_argument("--calcmode", default="normal",
                     help=f"calculation mode: {', '.join(CALCMODES)} (default normal); "
                          "each goes with some modes, see docs/modes.md")
    cmd.add_argument("--gamma", type=float, default=0.3, help="gamma for calcmode extract (default 0.3)")
    cmd.add_argument("--seed", type=int, default=-1, help="seed for calcmode 'plus random' (default -1: random, recorded)")
    cmd.add_argument("--alpha", type=float, default=0.5, help="alpha for every merged key (default 0.5)")
    cmd.add_argument("--beta", type=float, default=0.25, help="beta, for Triple sum / sum Twice (default 0.25)")
    cmd.add_argument("--weights-alpha", metavar="W", help="block weights for alpha (see below)")
    cmd.add_argument("--weights-beta", metavar="W", help="block weights for beta")
    _add_key_options(cmd)
    _add_dice_options(cmd)
    _add_output_options(cmd)
    add_allow_non_finite(cmd)
    cmd.add_argument("--prune", action="store_true", help="drop EMA and training-only keys")
    cmd.add_argument("--reset-clip", action="store_true", help="reset broken CLIP position_ids to 0..76")
    cmd.add_argument("--bake-vae", metavar="VAE", help="replace the VAE with this file's weights")
    cmd.set_defaults(run=run_merge)


def _add_key_options(cmd) -> None:
    group = cmd.add_argument_group("per-key options")
    group.add_argument("--elemental", metavar="TEXT",
                       help='elemental merge: "Blocks:Elements:Ratio" entries, e.g. "OUT03-OUT05:attn2:0.5, NOT M00:norm:0"')
    group.add_argument("--elemental-extended", action="store_true",
                       help="SDXL: elemental block names are the 110 fine ids (IN411 …)")
    chosen = group.add_mutually_exclusive_group()
    chosen.add_argument("--include", metavar="BLOCKS", help='merge only these blocks, e.g. "IN00-IN05 M00 VAE"')
    chosen.add_argument("--exclude", metavar="BLOCKS", help='keep these blocks as model A, e.g. "BASE VAE Adjust"')
    group.add_argument("--filter-elements", metavar="TEXT",
                       help='with --include/--exclude: also keys holding these comma-separated substrings')
    group.add_argument("--adjust", metavar="IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3",
                       help="detail, contrast, brightness and colour adjustments, e.g. 2,0,0,0,0,0,1,0")


def _add_dice_options(cmd) -> None:
    group = cmd.add_argument_group("let the dice roll (random block weights)")
    group.add_argument("--dice", metavar="MODE", default="off", help="R, U, X, D, ER, EU, EX or custom (default off)")
    group.add_argument("--dice-seed", type=int, default=-1, help="seed (default -1: random, recorded)")
    group.add_argument("--dice-round", type=int, default=3, help="decimals (default 3)")
    group.add_argument("--dice-custom", metavar="PATTERN", help="custom mode's 26 letters/numbers")
    group.add_argument("--dice-upper", default="", help="upper limit for X, mid point of D (one or per block)")
    group.add_argument("--dice-lower", default="", help="lower limit for X, range of D (aRp: a with chance p)")
    group.add_argument("--dice-upper-clamp", default="", help="upper clamp for X and D")
    group.add_argument("--dice-lower-clamp", default="", help="lower clamp for X and D")
    group.add_argument("--dice-beta", action="store_true", help="roll beta's weights too")


def _dice(args) -> Dice:
    options = {"custom": args.dice_custom} if args.dice_custom else {}
    return Dice(mode=args.dice, seed=args.dice_seed, round=args.dice_round, upper=args.dice_upper,
                lower=args.dice_lower, upper_clamp=args.dice_upper_clamp, lower_clamp=args.dice_lower_clamp,
                beta=args.dice_beta, **options)


def _add_output_options(cmd) -> None:
    cmd.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="the file to write")
    cmd.add_argument("--dtype", choices=list(OUTPUT_DTYPES), help="output precision (default: as model A)")
    cmd.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    cmd.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")


def add_allow_non_finite(cmd) -> None:
    """``--allow-non-finite``: a merged key holding NaN/Inf is written (and warned about), not refused."""
    cmd.add_argument("--allow-non-finite", action="store_true",
                     help="write the file even when a merged key holds NaN or Inf (default: refuse, naming the key)")


def _add_info(commands) -> None:
    cmd = commands.add_parser("info", help="architecture, dtypes, hashes and stored recipe of a checkpoint")
    cmd.add_argument("file", metavar="FILE")
    cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    cmd.set_defaults(run=run_info)


def _add_recipe(commands) -> None:
    cmd = commands.add_parser("recipe", help="re-run the merge recipe stored in a merged file",
                              description="Re-run the recipe stored in FILE's metadata (ours, the original "
                                          "SuperMerger's, A1111's or sd-mecha's, where it maps onto ours); the "
                                          "inputs are found in --models DIR by name, else by sha256.")
    cmd.add_argument("file", metavar="FILE")
    cmd.add_argument("--models", metavar="DIR", default=".", help="folder holding the input models (default .)")
    _add_output_options(cmd)
    add_allow_non_finite(cmd)
    cmd.add_argument("--prune", action="store_true", help="drop EMA and training-only keys (as merge --prune)")
    cmd.set_defaults(run=run_recipe)


def _add_demo(commands) -> None:
    cmd = commands.add_parser("demo", help="make small demo models in ./demo and merge them")
    cmd.add_argument("--folder", default="demo", help="where the demo models go (default ./demo)")
    cmd.add_argument("--preset", default="GRAD_V", help="block-weight preset to merge with (default GRAD_V)")
    cmd.set_defaults(run=run_demo)


def _add_ui(commands) -> None:
    cmd = commands.add_parser("ui", help="the Merge tab and the HTTP API as a standalone web app (no A1111 needed)",
                              description="Serve the Merge tab over the checkpoints in --models (subfolders "
                                          "included), and beside it the HTTP API (/supermerger/v1/..., "
                                          "described at /docs). Merges are saved to files; previews need the "
                                          "web UI. There is no login: keep --host on this machine, or put "
                                          "the app behind one.")
    cmd.add_argument("--models", metavar="DIR", help="checkpoints folder (default: the demo models, made once)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    cmd.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    cmd.set_defaults(run=run_ui)


def run_ui(args) -> int:
    from mergers.hosts.standalone import FolderHost
    from mergers.session import MergeSession

    try:
        from mergers.ui.app import launch
    except ModuleNotFoundError as error:  # a pip install without the `ui` extra has no gradio
        if error.name not in ("gradio", "fastapi", "uvicorn"):
            raise
        raise MergeError(f"`ui` needs {error.name}: pip install \"supermerger[ui]\" (or gradio)") from None

    folder = Path(args.models) if args.models else ensure_demo_models()[0].parent
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such folder")
    launch(MergeSession(FolderHost(folder)), host=args.host, port=args.port)
    return 0


def run_merge(args) -> int:
    if args.filter_elements and not (args.include or args.exclude):
        raise MergeError("--filter-elements needs --include or --exclude (say which of the two it means)")
    recipe = Recipe(model_a=args.model_a, model_b=args.model_b, model_c=args.model_c, mode=args.mode,
                    calcmode=args.calcmode, alpha=args.alpha, beta=args.beta, gamma=args.gamma, seed=args.seed,
                    weights_alpha=args.weights_alpha, weights_beta=args.weights_beta, dtype=args.dtype,
                    prune=args.prune, reset_clip=args.reset_clip, bake_vae=args.bake_vae,
                    elemental=args.elemental, elemental_extended=args.elemental_extended,
                    include_exclude="include" if args.include else "exclude" if args.exclude else "off",
                    include_exclude_blocks=args.include or args.exclude,
                    include_exclude_elements=args.filter_elements, adjust=args.adjust, dice=_dice(args))
    return _merge_and_report(recipe, args)


def _merge_and_report(recipe: Recipe, args, resolve=None) -> int:
    options = {"resolve": resolve} if resolve else {}
    with open_sources(recipe, resolve or resolve_path) as sources:  # headers only: errors come before any work
        print(estimate(recipe, sources, device=args.device).text())
        print("\n".join(license_lines(terms_of_sources(sources))))
    with tqdm(total=0, unit="key", desc="merging", disable=None) as bar:
        def progress(done: int, total: int, key: str) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = merge_to_file(recipe, args.output, device=args.device, overwrite=args.overwrite,
                               on_progress=progress, allow_non_finite=getattr(args, "allow_non_finite", False),
                               **options)
    plan = result.plan
    size = _size_text(result.path.stat().st_size)
    print(f"{plan.method.label} ({plan.method.formula}) of {plan.arch.label} models: "
          f"{plan.count('merge')} keys merged, {len(plan.steps) - plan.count('merge')} copied")
    for name, weights in (("alpha", plan.weights_alpha), ("beta", plan.weights_beta)):
        if weights is not None:
            print(f"{name} by block: {weights.as_readable()}")
    if plan.missing:  # named, so a merge of mismatched files is never silent about what it left as A
        print(missing_message(plan))
    print(f"wrote {result.path} ({size}) in {result.seconds:.1f} s")
    for warning in result.warnings:
        print(f"warning: {warning}")
    return 0


def _size_text(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def run_info(args) -> int:
    with open_checkpoint(args.file) as ckpt:
        facts = checkpoint_info(ckpt)
        terms = combine_terms([read_input_terms(ckpt, role="file")])
        made_from = made_from_lines(ckpt.metadata)
    if args.json:
        print_facts({**facts, "license": terms.to_dict()}, as_json=True)
    else:
        print_facts(facts, as_json=False)
        print("\n".join(license_lines(terms, combined="terms", made_from=made_from)))
    return 0


def print_facts(facts: dict, *, as_json: bool) -> None:
    """An ``info`` command's facts: JSON, or one aligned ``name: value`` line each."""
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    width = max(map(len, facts), default=0)
    for name, value in facts.items():
        print(f"{name:>{width}}: {value if not isinstance(value, (dict, list)) else json.dumps(value)}")


def checkpoint_info(ckpt) -> dict:
    """The facts ``info`` shows about an open checkpoint."""
    arch = detect_architecture(ckpt.shapes, ckpt.metadata, source=ckpt.name)
    dtypes: dict[str, int] = {}
    for key in ckpt:
        name = str(ckpt.dtype(key)).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    stored = stored_recipe(ckpt.metadata, source=ckpt.name)
    return {
        "file": str(ckpt.path),
        "architecture": arch.label,
        "blocks": f"{arch.layout}: {layout_named(arch.layout).shape_text}",  # what a weight string names
        "keys": len(ckpt),
        "dtypes": dtypes,
        "sha256": ckpt.sha256(),
        "shorthash": ckpt.shorthash(),
        "legacy_hash": ckpt.legacy_hash(),
        "recipe": stored[0].to_dict() if stored else _a1111_recipe(ckpt.metadata),
        "stored_recipes": describe_stored_recipes(ckpt.metadata, file_dtype=file_dtype_of(map(ckpt.dtype, ckpt))),
    }


def _a1111_recipe(metadata: dict):
    text = metadata.get(A1111_RECIPE_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_recipe(args) -> int:
    with open_checkpoint(args.file) as ckpt:  # ours, the original's, A1111's or sd-mecha's, where it maps
        mapped = rerunnable(ckpt.metadata, source=str(args.file), file_dtype=file_dtype_of(map(ckpt.dtype, ckpt)))
    print(f"replaying {mapped.summary} ({mapped.tool}); arithmetic: {mapped.arithmetic}")
    if mapped.not_recorded:
        print(f"note: its format does not record these settings, which may have been used: "
              f"{'; '.join(mapped.not_recorded)}")
    recipe = mapped.recipe.with_changes(**recipe_overrides(args))
    folder = Path(args.models)
    return _merge_and_report(recipe, args, resolve=lambda name: find_model(name, folder, mapped.models))


def recipe_overrides(args) -> dict:
    """The `recipe` command's options that change the stored recipe (the rest go to the merge itself)."""
    return {**({"dtype": args.dtype} if args.dtype else {}), **({"prune": True} if args.prune else {})}


def run_demo(args) -> int:
    started = time.perf_counter()
    paths = ensure_demo_models(Path(args.folder))
    print(f"demo models (real SD1.5 key names, small shapes): {', '.join(str(p) for p in paths[:2])}")
    output = Path(args.folder) / f"demo_merged_{args.preset}.safetensors"
    recipe = Recipe(model_a=str(paths[0]), model_b=str(paths[1]), mode="weight_sum", weights_alpha=args.preset)
    demo_args = argparse.Namespace(output=output, device="auto", overwrite=True)
    _merge_and_report(recipe, demo_args)
    print(f"demo done in {time.perf_counter() - started:.1f} s; see it with: {program_name()} info {output}")
    return 0


def main(argv: list[str] | None = None, command_modules: tuple[str, ...] = COMMAND_MODULES) -> int:
    ensure_utf8_console()
    args = build_parser(command_modules).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
