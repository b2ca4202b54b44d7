"""Chained recipes and Flux: time and peak RSS of whole CLI merges, next to the estimate.

For each architecture, on its synthetic models A and B (bench/make_models.py), as
child processes measured like bench/merge.py's rows (wall time, peak RSS from
``wait4``):

- the I/O floor: read A and B, write one output-sized file (bench/io_probe.py);
- ``merge`` weight sum, α = 0.5;
- ``merge`` weight sum with block weights (the layout's own block names);
- ``run`` of a chained recipe, (A ⊕ B) + (B − A)·0.5: the inner weight sum is a
  virtual model merged key by key inside the outer add-difference pass; nothing
  intermediate is written or held;
- the estimate ``run --estimate`` prints from the headers alone, for comparison.

Flux is the 12-billion-parameter transformer alone in fp8 (11.9 GB per file):
A, B and the output do not fit this machine's page cache together, so its rows
read from disk. A and B are hashed and read once, untimed, before the timed rows.

Example:
    python bench/make_models.py --arch flux --models a b
    python bench/chain.py --arch sdxl flux --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from merge import OUT, PYTHON, ROOT, Child, Run, machine, model_paths, run_child, try_drop_caches  # noqa: E402

# Block weights per layout, in the block-weight syntax users type (groups, then single blocks).
BLOCK_WEIGHTS = {"sd1": "GRAD_V", "sdxl": "GRAD_V", "flux": "ALL:0.5,D:0.3,S:0.7,OUT:1"}


def chained_recipe(a: Path, b: Path) -> dict:
    """(A ⊕ B) + (B − A)·0.5 as a version-2 recipe: the inner recipe sits in model A's slot."""
    inner = {"format": "supermerger-recipe", "version": 1, "model_a": str(a), "model_b": str(b),
             "mode": "weight_sum", "alpha": 0.5}
    return {"format": "supermerger-recipe", "version": 2, "model_a": inner, "model_b": str(b),
            "model_c": str(a), "mode": "add_difference", "alpha": 0.5}


def cases(arch: str, a: Path, b: Path, out: Path) -> list[tuple[str, list[str]]]:
    """The rows of ``arch``: (name, argv)."""
    recipe = OUT / f"{arch}_chain.recipe.json"
    recipe.write_text(json.dumps(chained_recipe(a, b), indent=1))
    merge = [PYTHON, "-m", "mergers", "merge", str(a), str(b), "-o", str(out), "--overwrite"]
    return [
        ("I/O floor: read 2 + write 1, interleaved",
         [PYTHON, str(BENCH / "io_probe.py"), str(out), str(a), str(b), "--pattern", "interleaved"]),
        ("merge weight_sum α=0.5", [*merge, "--alpha", "0.5"]),
        (f"merge weight_sum blocks {BLOCK_WEIGHTS[arch]}", [*merge, "--weights-alpha", BLOCK_WEIGHTS[arch]]),
        ("run chained (A ⊕ B) + (B − A)·0.5", [PYTHON, "-m", "mergers", "run", str(recipe), "-o", str(out),
                                                "--overwrite"]),
    ]


def estimate(arch: str, child: Child) -> str:
    """What ``run --estimate`` predicts for the chained recipe, from the headers alone."""
    recipe = OUT / f"{arch}_chain.recipe.json"
    done = subprocess.run([PYTHON, "-m", "mergers", "run", str(recipe), "--estimate"], env=child.env,
                          cwd=child.cwd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if re.search(r"RAM|estimate", line, re.I)]
    return " ".join(lines) or done.stdout.strip() or done.stderr.strip()


def bench(arch: str, directory: Path, runs: int, child: Child) -> list[str]:
    """Markdown rows for ``arch``: median wall s, min–max, peak RSS, × the floor."""
    a, b = model_paths(directory, arch, ["a", "b"])
    out = OUT / f"{arch}_chain_out.safetensors"
    rows = cases(arch, a, b, out)
    for path in (a, b):  # hash A and B once, untimed: the timed runs find the hashes in the cache
        run_child([PYTHON, "-m", "mergers", "info", str(path)], child)
    run_child(rows[0][1], child)  # and read them once, untimed, so the first row does not pay for a cold cache
    measured: list[list[Run]] = [[] for _ in rows]
    for index in range(runs):
        for (name, argv), done in zip(rows, measured):
            out.unlink(missing_ok=True)
            if child.drop:
                try_drop_caches()
            run = run_child(argv, child)
            if run.returncode != 0:
                raise SystemExit(f"{arch}: {name} failed ({run.returncode}); see {child.log}")
            done.append(run)
            print(f"{arch}: {name} run {index + 1}: {run.seconds:.1f} s, {run.peak_rss_mb:.0f} MB", flush=True)
    out.unlink(missing_ok=True)
    floor = statistics.median(r.seconds for r in measured[0])
    lines = []
    for (name, _), done in zip(rows, measured):
        seconds = statistics.median(r.seconds for r in done)
        rss = max(r.peak_rss_mb for r in done)
        lines.append(f"| {arch} | {name} | {len(done)} | {seconds:.1f} | {min(r.seconds for r in done):.1f}–"
                     f"{max(r.seconds for r in done):.1f} | {rss:.0f} | {seconds / floor:.2f} |")
    lines.append(f"| {arch} | estimate for the chained run (headers only) | – | {estimate(arch, child)} | | | |")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sdxl", "flux"], choices=sorted(BLOCK_WEIGHTS))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=BENCH / "models")
    parser.add_argument("--report", type=Path, default=BENCH / "results-chain.md")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before every run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    dropped = args.drop_caches and try_drop_caches()
    lines = ["| arch | case | runs | wall s (median) | min–max s | peak RSS MB | × I/O floor |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for arch in args.arch:
        env = {"SUPERMERGER_CACHE": str(OUT / "cache" / arch), "PYTHONPATH": str(ROOT)}
        child = Child({**os.environ, **env}, ROOT, OUT / f"{arch}_chain.log", dropped, 0.0, 0.0)
        lines += bench(arch, args.dir, args.runs, child)
    command = "python bench/chain.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(lines)
    args.report.write_text(f"# Chained and Flux merges\n\n{machine(dropped)}\n- command: `{command}`\n\n"
                           "Whole CLI processes (interpreter start, imports, header reads, hashing on a warm "
                           "cache, merge, write, fsync); peak RSS from wait4. The I/O floor reads A and B and "
                           "writes an output-sized file in 16 MB chunks.\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
