"""Time whole merge processes against this machine's I/O floor.

For each architecture, every case is run as a child process and measured for
wall time and peak RSS (``os.wait4`` rusage of that child). The I/O floor is
``bench/io_probe.py``: read the same inputs, write an output-sized file, fsync,
once sequentially and once interleaved; the faster median is the floor. Page
caches are dropped before every timed run when the system allows it, and the
cases run round-robin, so drift in disk speed hits every row alike.

A case is a row: a name, the models it reads and a function building its
command. The peers (bench/peers.py: a naive load-all merge as A1111's merger does
it, sd-mecha and sd-meh from PyPI) run from a venv this script makes under
bench/out/peers-venv, which reuses this project's torch. Peers that load whole
models need ~20 GB for SDXL: they run only with that much memory available right
before (``--skip-sdxl-peers`` skips them anyway). ``--warm`` keeps the page cache
(the issue's targets are warm-cache figures); the report gives medians, best of N,
and ratios to the I/O floor and to each peer of the same run.

Example:
    python bench/make_models.py --arch sd1 sdxl
    python bench/merge.py --arch sd1 sdxl --runs 3
    python bench/merge.py --arch sd1 sdxl --runs 3 sdxl=1   # fewer runs for the big one
    python bench/merge.py --arch sd1 --warm --runs 3         # warm page cache, with peers
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
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
class Settings:
    """What the command line chose: models, runs, which mergers/ to run, how to prepare each run."""

    directory: Path
    runs: dict[str, int]
    src: Path
    drop: bool
    settle: float
    quiet_wait: float


@dataclass(frozen=True)
class Child:
    """How children run: environment, working folder (holding the mergers package), log file, preparation."""

    env: dict[str, str]
    cwd: Path
    log: Path
    drop: bool = False
    settle: float = 0.0
    quiet_wait: float = 0.0


@dataclass(frozen=True)
class Run:
    """One measured child process, and how busy the CPUs were with other work just before it."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    cpu_seconds: float = 0.0
    busy_before: float = 0.0


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

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.runs)

    @property
    def busy_before(self) -> float:
        return statistics.median(r.busy_before for r in self.runs)


# ---------------------------------------------------------------- the cases


FLOOR_PATTERNS = ("sequential", "interleaved")


def io_floor(models: tuple[str, ...], pattern: str) -> Case:
    """An I/O floor for a merge reading ``models`` and writing one model (see io_probe.py)."""
    label = f"I/O floor: read {len(models)} + write 1, {pattern}"
    return Case(label, models, lambda inputs, out: [PYTHON, str(BENCH / "io_probe.py"), str(out),
                                                    *map(str, inputs), "--pattern", pattern], is_floor=True)


def supermerger(*options: str) -> Builder:
    """A builder for ``python -m mergers merge INPUTS -o OUT --overwrite OPTIONS``."""
    def build(inputs: Sequence[Path], out: Path) -> list[str]:
        return [PYTHON, "-m", "mergers", "merge", *map(str, inputs), "-o", str(out), "--overwrite", *options]
    return build


def supermerger_cases() -> list[Case]:
    """supermerger's rows: weight sum (flat and block weights) and add difference."""
    return [
        Case("supermerger startup only (merge --help)", (), lambda inputs, out: [PYTHON, "-m", "mergers", "merge", "--help"]),
        Case("supermerger weight_sum α=0.5", ("a", "b"),
             supermerger("--mode", "weight_sum", "--alpha", "0.5")),
        Case("supermerger weight_sum GRAD_V", ("a", "b"),
             supermerger("--mode", "weight_sum", "--weights-alpha", "GRAD_V")),
        Case("supermerger add_difference α=0.5", ("a", "b", "c"),
             supermerger("--mode", "add_difference", "--alpha", "0.5")),
    ]


PEERS_VENV = OUT / "peers-venv"
PEER_PACKAGES = ("sd-mecha", "sd-meh", "tensordict")  # sd-meh imports tensordict without declaring it
# Whole-model peers hold A, B (and C) and the result: ~20 GB for SDXL, ~6.5 GB for SD1.5.
PEER_MEMORY_GB = {"sd1": 8, "sd2": 8, "sdxl": 22}


def peer(name: str, mode: str, python: str) -> Builder:
    """A builder for ``bench/peers.py NAME MODE 0.5 OUT INPUTS`` under ``python``."""
    def build(inputs: Sequence[Path], out: Path) -> list[str]:
        return [python, str(BENCH / "peers.py"), name, mode, "0.5", str(out), *map(str, inputs)]
    return build


def peer_cases(arch: str) -> list[Case]:
    """The peers' rows (weight sum and add difference, α = 0.5), or none when memory is short."""
    if not peers_fit(arch):
        return []
    python = str(PEERS_VENV / "bin" / "python")
    rows = [("naive load-all (A1111's merger)", "naive", PYTHON),
            ("naive load-all + fsync (its file on disk, like ours)", "naive-fsync", PYTHON),
            ("sd-mecha", "sd-mecha", python),
            ("sd-meh", "sd-meh", python)]
    return [Case(f"{label} {mode} α=0.5", models, peer(name, mode, exe))
            for label, name, exe in rows
            for mode, models in (("weight_sum", ("a", "b")), ("add_difference", ("a", "b", "c")))]


SKIPPED: list[str] = []  # notes for the report: peers left out and why


def peers_fit(arch: str) -> bool:
    """True when the whole-model peers may run for ``arch`` now (memory available, not skipped)."""
    import psutil
    available = psutil.virtual_memory().available / 2**30
    if arch == "sdxl" and SKIP_SDXL_PEERS:
        SKIPPED.append(f"{arch}: peers skipped (--skip-sdxl-peers)")
        return False
    if available < PEER_MEMORY_GB[arch]:
        SKIPPED.append(f"{arch}: peers skipped: {available:.1f} GB available, they need {PEER_MEMORY_GB[arch]} GB")
        return False
    return True


SKIP_SDXL_PEERS = False


def ensure_peers_venv() -> None:
    """Make bench/out/peers-venv with the peers from PyPI; it sees this venv's torch through a .pth file."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([PYTHON, "-m", "venv", str(PEERS_VENV)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        ours = subprocess.run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "_supermerger_torch.pth").write_text(ours + "\n")  # same torch for every row
    missing = subprocess.run([str(python), "-c", "import sd_mecha, sd_meh.merge"], capture_output=True).returncode
    if missing:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)


# Rows to compare, each a function arch -> list[Case].
PEERS: tuple[Callable[[str], list[Case]], ...] = (lambda arch: supermerger_cases(), peer_cases)


def cases_for(arch: str) -> list[Case]:
    """Every row for ``arch``: the I/O floors of each distinct input set, then each peer's cases."""
    peer_cases = [case for peer in PEERS for case in peer(arch)]
    input_sets = dict.fromkeys(case.models for case in peer_cases if case.models)
    floors = [io_floor(models, pattern) for models in input_sets for pattern in FLOOR_PATTERNS]
    return [*floors, *peer_cases]


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


def run_child(argv: list[str], child: Child) -> Run:
    """Run ``argv`` to completion; its wall time and peak RSS (from ``wait4``), output to the log."""
    with open(child.log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child.env, cwd=child.cwd)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return Run(seconds, usage.ru_maxrss / 1024, process.returncode, usage.ru_utime + usage.ru_stime)


def measure(argv: list[str], child: Child, out: Path) -> Run:
    """One timed run from a clean state: no output file, caches dropped, the disk and CPUs left to settle."""
    out.unlink(missing_ok=True)
    if child.drop:
        try_drop_caches()
    time.sleep(child.settle)
    busy = wait_for_quiet(child.quiet_wait)
    run = run_child(argv, child)
    if run.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... failed with {run.returncode}; see {child.log}")
    return dataclasses.replace(run, busy_before=busy)


def wait_for_quiet(max_wait: float, threshold: float = 20.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` % of the CPUs; return the last %.

    Our own children have exited by now, so whatever keeps the CPUs busy is someone else's work.
    """
    import psutil
    deadline = time.monotonic() + max_wait
    while True:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def make_child(arch: str, settings: Settings) -> Child:
    """Children of ``arch`` get a hash cache under bench/out and import mergers from ``settings.src`` (their cwd)."""
    env = {**os.environ, "SUPERMERGER_CACHE": str(OUT / "cache" / arch), "PYTHONPATH": str(settings.src)}
    return Child(env, settings.src, OUT / f"{arch}.log", settings.drop, settings.settle, settings.quiet_wait)


def snapshot_source(dest: Path) -> tuple[Path, str]:
    """Copy ``mergers/`` to ``dest/mergers`` so edits made during the run don't change what is timed.

    Returns the folder to import from and a short digest of the copied ``.py`` files.
    """
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT / "mergers", dest / "mergers", ignore=shutil.ignore_patterns("__pycache__"))
    return dest, source_digest(dest / "mergers")


def source_digest(package: Path) -> str:
    """sha256 (12 hex digits) over the package's ``.py`` files, by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def model_paths(directory: Path, arch: str, names: Sequence[str]) -> list[Path]:
    """The synthetic model files of ``arch`` (see make_models.py); they must exist."""
    paths = [directory / f"{arch}_{name}.safetensors" for name in names]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{path} is missing; run: python bench/make_models.py --arch {arch}")
    return paths


def warm_up(arch: str, directory: Path, child: Child) -> Run:
    """The first merge on a cold hash cache (timed, reported apart; its output checked), then hash C untimed."""
    first = next(case for case in supermerger_cases() if case.models == ("a", "b"))
    out = OUT / f"{arch}_warmup.safetensors"
    inputs = model_paths(directory, arch, first.models)
    run = measure(first.build(inputs, out), child, out)
    check = run_child([PYTHON, str(BENCH / "check_merge.py"), str(out), *map(str, inputs), "--alpha", "0.5"], child)
    if check.returncode != 0:
        raise RuntimeError(f"{arch}: the weight sum output is wrong; see {child.log} and {out}")
    out.unlink(missing_ok=True)
    c_path = model_paths(directory, arch, ["c"])[0]
    run_child([PYTHON, "-m", "mergers", "info", str(c_path)], child)
    return run


def bench_arch(arch: str, settings: Settings) -> tuple[list[Row], Run]:
    """Measure every case of ``arch`` ``settings.runs[arch]`` times, round-robin so drift hits all alike.

    Also returns the first, cold-hash-cache merge, measured apart.
    """
    child = make_child(arch, settings)
    shutil.rmtree(child.env["SUPERMERGER_CACHE"], ignore_errors=True)
    first = warm_up(arch, settings.directory, child)
    print(f"{arch}: first merge (hashing A and B) {first.seconds:.1f} s, {first.peak_rss_mb:.0f} MB", flush=True)
    out = OUT / f"{arch}_out.safetensors"
    cases = cases_for(arch)
    commands = [case.build(model_paths(settings.directory, arch, case.models), out) for case in cases]
    measured: list[list[Run]] = [[] for _ in cases]
    for index in range(settings.runs[arch]):
        for case, argv, done in zip(cases, commands, measured):
            if is_peer(case) and not memory_for_peer(arch):  # checked right before each run: others share the RAM
                continue
            done.append(measure(argv, child, out))
            print(f"{arch}: {case.name} run {index + 1}: {done[-1].seconds:.1f} s, CPU {done[-1].cpu_seconds:.1f} s, "
                  f"{done[-1].peak_rss_mb:.0f} MB, others' CPU {done[-1].busy_before:.0f} %", flush=True)
    out.unlink(missing_ok=True)
    return [Row(arch, case, tuple(done)) for case, done in zip(cases, measured) if done], first


def is_peer(case: Case) -> bool:
    return not case.is_floor and not case.name.startswith("supermerger")


def memory_for_peer(arch: str) -> bool:
    """True when a whole-model peer fits in the memory available now; else the run is noted and skipped."""
    import psutil
    available = psutil.virtual_memory().available / 2**30
    if available >= PEER_MEMORY_GB[arch]:
        return True
    SKIPPED.append(f"{arch}: a peer run skipped: {available:.1f} GB available, it needs {PEER_MEMORY_GB[arch]} GB")
    return False


# ---------------------------------------------------------------- reporting


def floor_seconds(arch: str, models: tuple[str, ...], rows: Sequence[Row]) -> float | None:
    """The I/O floor for these inputs: the fastest median among the floor rows reading them."""
    floors = [r.seconds for r in rows if r.case.is_floor and r.arch == arch and r.case.models == models]
    return min(floors) if floors else None


def table(rows: Sequence[Row], firsts: dict[str, Run]) -> str:
    """The results as a markdown table."""
    lines = ["| arch | case | runs | wall s (median) | min–max s | CPU s | peak RSS MB | × I/O floor | "
             "× I/O floor (best of N) | others' CPU % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        floor = floor_seconds(row.arch, row.case.models, rows)
        best_floor = floor_best(row.arch, row.case.models, rows)
        best = min(r.seconds for r in row.runs)
        ratio = f"{row.seconds / floor:.2f}" if floor else "–"
        best_ratio = f"{best / best_floor:.2f}" if best_floor else "–"
        spread = f"{best:.1f}–{max(r.seconds for r in row.runs):.1f}"
        lines.append(f"| {row.arch} | {row.case.name} | {len(row.runs)} | {row.seconds:.1f} | {spread} | "
                     f"{row.cpu_seconds:.1f} | {row.peak_rss_mb:.0f} | {ratio} | {best_ratio} | {row.busy_before:.0f} |")
    for arch, run in firsts.items():
        floor = floor_seconds(arch, ("a", "b"), rows)
        lines.append(f"| {arch} | first run: weight_sum α=0.5, hashing A+B (cold hash cache) | 1 | "
                     f"{run.seconds:.1f} | – | {run.cpu_seconds:.1f} | {run.peak_rss_mb:.0f} | "
                     f"{run.seconds / floor:.2f} | – | {run.busy_before:.0f} |")
    return "\n".join(lines) + "\n\n" + peer_table(rows)


def floor_best(arch: str, models: tuple[str, ...], rows: Sequence[Row]) -> float | None:
    """The I/O floor's best single run for these inputs."""
    floors = [min(r.seconds for r in row.runs) for row in rows
              if row.case.is_floor and row.arch == arch and row.case.models == models]
    return min(floors) if floors else None


def peer_table(rows: Sequence[Row]) -> str:
    """supermerger's α=0.5 rows against each peer's row for the same mode, from the same run."""
    lines = ["| arch | mode | peer | peer wall s (median) | supermerger wall s | peer ÷ supermerger (median) | "
             "(best of N) | peer RSS MB | supermerger RSS MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for ours in (r for r in rows if r.case.name.startswith("supermerger ") and "α=0.5" in r.case.name):
        mode = ours.case.name.split()[1]
        for theirs in (r for r in rows if r.arch == ours.arch and not r.case.is_floor
                       and not r.case.name.startswith("supermerger") and f" {mode} " in r.case.name):
            best = min(r.seconds for r in theirs.runs) / min(r.seconds for r in ours.runs)
            lines.append(f"| {ours.arch} | {mode} | {theirs.case.name.rsplit(' ' + mode, 1)[0]} | {theirs.seconds:.1f} | "
                         f"{ours.seconds:.1f} | {theirs.seconds / ours.seconds:.2f} | {best:.2f} | "
                         f"{theirs.peak_rss_mb:.0f} | {ours.peak_rss_mb:.0f} |")
    return "\n".join(lines + [f"\n- {note}" for note in SKIPPED])


def machine(dropped: bool) -> str:
    """The machine and software the figures come from."""
    import psutil  # small; torch is not imported here, so children's peak RSS is not inflated by ours
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    caches = ("page cache dropped before every timed run (drop_caches; a VM host below may still cache)" if dropped
              else "page cache warm: not dropped between runs (--warm, or drop_caches not permitted)")
    return (f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
            f"- CPU: {cpu}, {os.cpu_count()} cores; RAM {psutil.virtual_memory().total / 2**30:.1f} GiB\n"
            f"- Python {platform.python_version()}, torch {importlib.metadata.version('torch')}, {platform.platform()}\n"
            f"- {caches}")


def write_report(path: Path, rows: Sequence[Row], firsts: dict[str, Run], dropped: bool, command: str,
                 source: str) -> str:
    """Write ``bench/results.md``; return the table."""
    text = table(rows, firsts)
    path.write_text(f"# Merge benchmark\n\n{machine(dropped)}\n- command: `{command}`\n- {source}\n\n"
                    "Synthetic fp16 models with the real key names and shapes (bench/make_models.py). "
                    "Wall time of the whole process (interpreter start, imports, header reads, merge, write, "
                    "fsync); peak RSS from wait4 (it includes the ~20 MB benchmark parent at fork). "
                    "The hash cache is warm in timed runs. × I/O floor: median / the faster floor median "
                    "for the same inputs. CPU s: user+sys of the child. others' CPU %: how busy the CPUs were "
                    "with other work in the second before each run (median), after waiting up to --quiet-wait "
                    "for it to drop under 20 %.\n\n"
                    f"{text}\n")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--runs", nargs="+", default=["3"], metavar="N|ARCH=N",
                        help="timed runs per case, the median is reported; ARCH=N overrides for one arch "
                             "(e.g. --runs 3 sdxl=1; default 3)")
    parser.add_argument("--dir", type=Path, default=BENCH / "models", help="where make_models.py wrote the models")
    parser.add_argument("--report", type=Path, default=BENCH / "results.md")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait after dropping caches, before each timed run (default 5)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each timed run, wait up to this many seconds for other work to stop "
                             "using the CPUs (default 20)")
    parser.add_argument("--warm", action="store_true",
                        help="keep the page cache between runs (warm-cache figures, as the issue's targets)")
    parser.add_argument("--skip-sdxl-peers", action="store_true",
                        help="never run the whole-model peers on SDXL (they need ~20 GB of RAM)")
    parser.add_argument("--no-peers", action="store_true", help="only supermerger's rows and the I/O floor")
    parser.add_argument("--live", action="store_true",
                        help="run the checkout's mergers/ as it is, not a snapshot taken at start")
    return parser.parse_args(argv)


def runs_per_arch(items: Sequence[str], archs: Sequence[str]) -> dict[str, int]:
    """``["3", "sdxl=1"]`` -> ``{"sd1": 3, "sdxl": 1}`` for the archs asked for.

    Example:
        >>> runs_per_arch(["3", "sdxl=1"], ["sd1", "sdxl"])
        {'sd1': 3, 'sdxl': 1}
    """
    default = 3
    overrides: dict[str, int] = {}
    for item in items:
        arch, _, count = item.rpartition("=")
        if arch:
            overrides[arch] = int(count)
        else:
            default = int(count)
    return {arch: overrides.get(arch, default) for arch in archs}


def main(argv: list[str] | None = None) -> int:
    global PEERS, SKIP_SDXL_PEERS
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    SKIP_SDXL_PEERS = args.skip_sdxl_peers
    if args.no_peers:
        PEERS = PEERS[:1]
    else:
        ensure_peers_venv()
    dropped = False if args.warm else try_drop_caches()
    if args.live:
        src, source = ROOT, "mergers/ run live from the checkout"
    else:
        src, digest = snapshot_source(OUT / "src")
        source = f"mergers/ snapshot {digest} (sha256 of its .py files) copied at start"
    settings = Settings(args.dir, runs_per_arch(args.runs, args.arch), src, dropped, args.settle, args.quiet_wait)
    rows: list[Row] = []
    firsts: dict[str, Run] = {}
    command = "python bench/merge.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for arch in args.arch:
        arch_rows, firsts[arch] = bench_arch(arch, settings)
        rows.extend(arch_rows)
        text = write_report(args.report, rows, firsts, dropped, command, source)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
