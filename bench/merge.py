"""Time whole merge processes against this machine's I/O floor.

For each architecture, every case is run as a child process and measured for
wall time and peak RSS (``os.wait4`` rusage of that child). The I/O floor is
``bench/io_probe.py``: read the same inputs, write an output-sized file, fsync.
Page caches are dropped before every timed run when the system allows it, so
every run reads from disk.

A case is a row: a name, the models it reads and a function building its
command. Peers (sd-mecha, a naive load-all merge) are added to ``PEERS``.

Example:
    python bench/make_models.py --arch sd1 sdxl
    python bench/merge.py --arch sd1 sdxl --runs 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
PYTHON = sys.executable

Builder = Callable[[Sequence[Path], Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One table row: what it runs, on which models (by name, e.g. ("a", "b"))."""

    name: str
    models: tuple[str, ...]
    build: Builder
    is_floor: bool = False


@dataclass(frozen=True)
class Run:
    """One measured child process."""

    seconds: float
    peak_rss_mb: float
    returncode: int


@dataclass(frozen=True)
class Row:
    """A case's measured runs, summarised."""

    arch: str
    case: Case
    runs: tuple[Run, ...]

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def peak_rss_mb(self) -> float:
        return statistics.median(r.peak_rss_mb for r in self.runs)


# ---------------------------------------------------------------- the cases


def io_floor(models: tuple[str, ...]) -> Case:
    """The I/O floor for a merge reading ``models`` and writing one model."""
    label = f"I/O floor: read {len(models)} + write 1"
    return Case(label, models, lambda inputs, out: [PYTHON, str(BENCH / "io_probe.py"), str(out), *map(str, inputs)],
                is_floor=True)


def supermerger(*options: str) -> Builder:
    """A builder for ``python -m mergers merge INPUTS -o OUT --overwrite OPTIONS``."""
    def build(inputs: Sequence[Path], out: Path) -> list[str]:
        return [PYTHON, "-m", "mergers", "merge", *map(str, inputs), "-o", str(out), "--overwrite", *options]
    return build


def supermerger_cases() -> list[Case]:
    """supermerger's rows: weight sum (flat and block weights) and add difference."""
    return [
        Case("supermerger weight_sum α=0.5", ("a", "b"),
             supermerger("--mode", "weight_sum", "--alpha", "0.5")),
        Case("supermerger weight_sum GRAD_V", ("a", "b"),
             supermerger("--mode", "weight_sum", "--weights-alpha", "GRAD_V")),
        Case("supermerger add_difference α=0.5", ("a", "b", "c"),
             supermerger("--mode", "add_difference", "--alpha", "0.5")),
    ]


# Peers to compare, each a function arch -> list[Case]; e.g. sd-mecha or a naive load-all merge.
PEERS: tuple[Callable[[str], list[Case]], ...] = (lambda arch: supermerger_cases(),)


def cases_for(arch: str) -> list[Case]:
    """Every row for ``arch``: one I/O floor per distinct input set, then each peer's cases."""
    peer_cases = [case for peer in PEERS for case in peer(arch)]
    floors = {case.models: io_floor(case.models) for case in peer_cases}
    return [*floors.values(), *peer_cases]


# ---------------------------------------------------------------- measuring


def try_drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False where not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as file:
            file.write("3\n")
        return True
    except OSError:
        return False


def run_child(argv: list[str], env: dict[str, str], log: Path) -> Run:
    """Run ``argv`` to completion; its wall time and peak RSS (from ``wait4``), output to ``log``."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return Run(seconds, usage.ru_maxrss / 1024, process.returncode)


def measure(argv: list[str], env: dict[str, str], log: Path, out: Path, drop: bool) -> Run:
    """One timed run from a clean state: no output file, caches dropped if ``drop``."""
    out.unlink(missing_ok=True)
    if drop:
        try_drop_caches()
    run = run_child(argv, env, log)
    if run.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... failed with {run.returncode}; see {log}")
    return run


def merge_env(cache: Path) -> dict[str, str]:
    """The environment for children: the hash cache under bench/out, this checkout importable."""
    return {**os.environ, "SUPERMERGER_CACHE": str(cache), "PYTHONPATH": str(ROOT)}


def model_paths(directory: Path, arch: str, names: Sequence[str]) -> list[Path]:
    """The synthetic model files of ``arch`` (see make_models.py); they must exist."""
    paths = [directory / f"{arch}_{name}.safetensors" for name in names]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{path} is missing; run: python bench/make_models.py --arch {arch}")
    return paths


def warm_up(arch: str, directory: Path, env: dict[str, str], log: Path, drop: bool) -> Run:
    """The first merge on a cold hash cache (timed, reported apart), then hash C untimed."""
    first = supermerger_cases()[0]
    out = OUT / f"{arch}_warmup.safetensors"
    run = measure(first.build(model_paths(directory, arch, first.models), out), env, log, out, drop)
    out.unlink(missing_ok=True)
    c_path = model_paths(directory, arch, ["c"])[0]
    run_child([PYTHON, "-m", "mergers", "info", str(c_path)], env, log)
    return run


def bench_arch(arch: str, directory: Path, runs: int, drop: bool) -> tuple[list[Row], Run]:
    """Measure every case of ``arch`` ``runs`` times; also the cold first merge."""
    cache = OUT / "cache" / arch
    shutil.rmtree(cache, ignore_errors=True)
    env = merge_env(cache)
    log = OUT / f"{arch}.log"
    first = warm_up(arch, directory, env, log, drop)
    print(f"{arch}: first merge (hashing A and B) {first.seconds:.1f} s, {first.peak_rss_mb:.0f} MB", flush=True)
    rows = []
    for case in cases_for(arch):
        out = OUT / f"{arch}_out.safetensors"
        argv = case.build(model_paths(directory, arch, case.models), out)
        measured = []
        for index in range(runs):
            measured.append(measure(argv, env, log, out, drop))
            print(f"{arch}: {case.name} run {index + 1}: {measured[-1].seconds:.1f} s, "
                  f"{measured[-1].peak_rss_mb:.0f} MB", flush=True)
        out.unlink(missing_ok=True)
        rows.append(Row(arch, case, tuple(measured)))
    return rows, first


# ---------------------------------------------------------------- reporting


def floor_of(row: Row, rows: Sequence[Row]) -> Row | None:
    """The I/O floor row with the same inputs as ``row``."""
    return next((r for r in rows if r.case.is_floor and r.arch == row.arch and r.case.models == row.case.models), None)


def table(rows: Sequence[Row], firsts: dict[str, Run]) -> str:
    """The results as a markdown table."""
    lines = ["| arch | case | runs | wall s (median) | min–max s | peak RSS MB | × I/O floor |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        floor = floor_of(row, rows)
        ratio = f"{row.seconds / floor.seconds:.2f}" if floor else "–"
        spread = f"{min(r.seconds for r in row.runs):.1f}–{max(r.seconds for r in row.runs):.1f}"
        lines.append(f"| {row.arch} | {row.case.name} | {len(row.runs)} | {row.seconds:.1f} | {spread} | "
                     f"{row.peak_rss_mb:.0f} | {ratio} |")
    for arch, run in firsts.items():
        floor = next(r for r in rows if r.arch == arch and r.case.is_floor and r.case.models == ("a", "b"))
        lines.append(f"| {arch} | first run: weight_sum α=0.5, hashing A+B (cold hash cache) | 1 | "
                     f"{run.seconds:.1f} | – | {run.peak_rss_mb:.0f} | {run.seconds / floor.seconds:.2f} |")
    return "\n".join(lines)


def machine(dropped: bool) -> str:
    """The machine and software the figures come from."""
    import psutil
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    caches = ("page cache dropped before every timed run (every run reads from disk)" if dropped
              else "page cache NOT dropped (not permitted): runs may read from cache")
    return (f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
            f"- CPU: {cpu}, {os.cpu_count()} cores; RAM {psutil.virtual_memory().total / 2**30:.1f} GiB\n"
            f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}\n"
            f"- {caches}")


def write_report(path: Path, rows: Sequence[Row], firsts: dict[str, Run], dropped: bool, command: str) -> str:
    """Write ``bench/results.md``; return the table."""
    text = table(rows, firsts)
    path.write_text(f"# Merge benchmark\n\n{machine(dropped)}\n- command: `{command}`\n\n"
                    "Synthetic fp16 models with the real key names and shapes (bench/make_models.py). "
                    "Wall time of the whole process (interpreter start, imports, header reads, merge, write, "
                    "fsync); peak RSS from wait4. The hash cache is warm in timed runs.\n\n"
                    f"{text}\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (the median is reported)")
    parser.add_argument("--dir", type=Path, default=BENCH / "models", help="where make_models.py wrote the models")
    parser.add_argument("--report", type=Path, default=BENCH / "results.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    dropped = try_drop_caches()
    rows: list[Row] = []
    firsts: dict[str, Run] = {}
    command = "python bench/merge.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for arch in args.arch:
        arch_rows, firsts[arch] = bench_arch(arch, args.dir, args.runs, dropped)
        rows.extend(arch_rows)
        text = write_report(args.report, rows, firsts, dropped, command)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
