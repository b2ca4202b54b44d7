"""``python -m mergers analyze A B``: how alike two models are, block by block, as a table, CSV and PNG.

With ``--merged M`` it also reads how much of B a merge M of A and B holds (per block: a weight
sum at alpha 0.3 reads ≈ 0.3), to check that a recipe did what was meant.

Example:
    python -m mergers analyze a.safetensors b.safetensors --csv ab.csv --plot ab.png
    python -m mergers analyze a.safetensors b.safetensors --merged ab.safetensors --stat coefficient
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mergers.analysis import BY, CHARTS, Comparison, compare_merge, compare_models, csv_text, render_chart
from mergers.analysis.chart import short_number
from mergers.analysis.compare import FIT_STATISTICS, GROUP_STATISTICS
from mergers.errors import MergeError, OutputError

STATISTICS = GROUP_STATISTICS + FIT_STATISTICS
TEXT_COLUMNS = {"block": ("name", "keys", "cosine", "cosine_min", "cosine_attn2", "relative_l2"),
                "key": ("name", "block", "cosine", "relative_l2", "norm_a", "norm_b")}


def add_command(commands) -> None:
    """Add ``analyze`` to the CLI's subcommands."""
    cmd = commands.add_parser(
        "analyze", help="compare two models block by block (cosine, relative L2); CSV and PNG",
        description="Compare MODEL_A with MODEL_B key by key, streamed (one tensor of each in memory), "
                    "and sum the figures up per block and per component (text encoder, U-Net, VAE).")
    cmd.add_argument("model_a", metavar="MODEL_A")
    cmd.add_argument("model_b", metavar="MODEL_B")
    cmd.add_argument("--merged", metavar="MERGED", help="a merge of A and B: also show how much of B it holds")
    cmd.add_argument("--by", choices=BY, default="block", help="rows per block (default) or per key")
    cmd.add_argument("--csv", metavar="OUT.csv", help="write the rows as CSV")
    cmd.add_argument("--plot", metavar="OUT.png", help="draw the blocks as a PNG chart")
    cmd.add_argument("--chart", choices=CHARTS, default="bars", help="bars of --stat (default) or a heatmap")
    cmd.add_argument("--stat", choices=STATISTICS, default=None,
                     help="statistic of the bar chart (default cosine; coefficient with --merged)")
    cmd.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    cmd.set_defaults(run=run_analyze)


def run_analyze(args) -> int:
    inputs = [p for p in (args.model_a, args.model_b, args.merged) if p]
    for output in (args.csv, args.plot):
        _check_output(output, inputs)
    statistic = args.stat or ("coefficient" if args.merged else "cosine")
    if statistic in FIT_STATISTICS and not args.merged:
        raise MergeError(f"--stat {statistic} needs --merged (a merge of the two models)")
    result = _run_with_bar(args)
    if args.csv:
        Path(args.csv).write_text(csv_text(result.rows), encoding="utf-8", newline="")
    if args.plot:
        render_chart(result, statistic, args.chart).save(args.plot, format="PNG")
    print(json.dumps(result.to_dict(), indent=2) if args.json else report_text(result))
    return 0


def _check_output(output: str | None, inputs: Sequence[str]) -> None:
    """Refuse to write over an input model, whatever the spelling of its path."""
    if output and any(Path(p).exists() and os.path.exists(output) and os.path.samefile(output, p) for p in inputs):
        raise OutputError(f"{output}: is one of the input models; choose another output file")


def _run_with_bar(args) -> Comparison:
    with tqdm(total=0, unit="key", desc="comparing", disable=None) as bar:
        def progress(done: int, total: int, key: str) -> None:
            bar.total = total
            bar.update(done - bar.n)

        if args.merged:
            return compare_merge(args.model_a, args.model_b, args.merged, by=args.by, on_progress=progress)
        return compare_models(args.model_a, args.model_b, by=args.by, on_progress=progress)


def report_text(result: Comparison) -> str:
    """The rows and the components as aligned text tables, with what was left out.

    Example:
        >>> print(report_text(compare_models("a.safetensors", "b.safetensors")))
    """
    fits = FIT_STATISTICS if result.model_merged else ()
    lines = [f"{result.architecture}: {result.model_a} vs {result.model_b}"
             + (f", merge {result.model_merged}" if result.model_merged else "")
             + f" ({len(result.keys)} keys, {result.seconds:.1f} s)", ""]
    lines += text_table(result.rows, TEXT_COLUMNS[result.by] + fits)
    lines += ["", *text_table(result.components, TEXT_COLUMNS["block"] + fits)]
    if result.skipped:
        lines += ["", f"{len(result.skipped)} keys not compared, e.g. {result.skipped[0][0]}: {result.skipped[0][1]}"]
    return "\n".join(lines)


def text_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    """Rows as lines of left-aligned names and right-aligned numbers.

    Example:
        >>> text_table([{"name": "IN00", "cosine": 0.5}], ("name", "cosine"))
        ['name  cosine', 'IN00  0.5000']
    """
    cells = [list(columns)] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths)))
            for line in cells]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return short_number(value)
    return str(value)

