"""Time an in-place merge swap into a loaded model, and its peak extra RAM.

Loads model A of the benchmark models into a real torch module with the real
keys (as a web UI holds it, fp16 on the CPU), then merges A and B into it with
the same session the tab uses, and restores it. Extra RAM is the peak RSS
during the swap minus the RSS with the model loaded (polled every 20 ms).

Example:
    python bench/make_models.py --arch sdxl
    python bench/swap.py --arch sdxl
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mergers.hosts.standalone import FolderHost  # noqa: E402
from mergers.recipe import Recipe  # noqa: E402
from mergers.session import MergeSession  # noqa: E402
from tests.live_model import FakeLive  # noqa: E402


class PeakRss:
    """Polls this process's RSS on a thread and keeps the highest value."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(arch: str, folder: Path) -> str:
    """One markdown row: load, swap and restore times, and the swap's peak extra RAM."""
    started = time.perf_counter()
    live = FakeLive.load(folder / f"{arch}_a.safetensors")
    loaded = time.perf_counter() - started

    class Host(FolderHost):
        def live_model(self):
            return live

    session = MergeSession(Host(folder, data_dir=ROOT / "bench" / "out" / "history"))
    base = psutil.Process().memory_info().rss
    with PeakRss() as peak:
        started = time.perf_counter()
        outcome = session.merge(Recipe(model_a=f"{arch}_a.safetensors", model_b=f"{arch}_b.safetensors", alpha=0.5))
        swapped = time.perf_counter() - started
    started = time.perf_counter()
    restored = session.restore()
    restore_s = time.perf_counter() - started
    extra = (peak.peak - base) / 2**20
    return (f"| {arch} | {loaded:.1f} | {swapped:.1f} ({outcome.merged_keys} keys) | {restore_s:.1f} ({restored} keys) "
            f"| {base / 2**30:.2f} | {extra:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"])
    parser.add_argument("--dir", default=str(ROOT / "bench" / "models"))
    args = parser.parse_args()
    print("| arch | load model s | merge + swap s | restore s | RSS with model GiB | peak extra RAM MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        print(measure(arch, Path(args.dir)), flush=True)


if __name__ == "__main__":
    main()
