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
import statistics
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


def read_seconds(paths: list[Path]) -> float:
    """Reading ``paths`` start to end into user space (16 MB ``readinto``): the reference a swap is held to."""
    buffer = bytearray(16 << 20)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
    return time.perf_counter() - started


def measure(arch: str, folder: Path, repeats: int) -> str:
    """One markdown row: load, the first swap (fresh buffers), the median of ``repeats`` later swaps
    (α varied, restored after each), restore, reading A and B, and the swaps' peak extra RAM."""
    started = time.perf_counter()
    live = FakeLive.load(folder / f"{arch}_a.safetensors")
    loaded = time.perf_counter() - started

    class Host(FolderHost):
        def live_model(self):
            return live

    session = MergeSession(Host(folder, data_dir=ROOT / "bench" / "out" / "history"))
    recipe = Recipe(model_a=f"{arch}_a.safetensors", model_b=f"{arch}_b.safetensors", alpha=0.5)
    base = psutil.Process().memory_info().rss
    swaps, restores = [], []
    with PeakRss() as peak:
        for n in range(repeats + 1):
            started = time.perf_counter()
            outcome = session.merge(recipe.with_changes(alpha=0.3 + 0.1 * n))
            swaps.append(time.perf_counter() - started)
            started = time.perf_counter()
            restored = session.restore()
            restores.append(time.perf_counter() - started)
    reads = [read_seconds([folder / f"{arch}_{m}.safetensors" for m in "ab"]) for _ in range(3)]
    later = statistics.median(swaps[1:]) if repeats else swaps[0]
    extra = (peak.peak - base) / 2**20
    return (f"| {arch} | {loaded:.1f} | {swaps[0]:.2f} | {later:.2f} ({min(swaps[1:] or swaps):.2f}) "
            f"({outcome.merged_keys} keys) | {statistics.median(restores):.2f} ({restored} keys) | "
            f"{statistics.median(reads):.2f} ({min(reads):.2f}) | {later / statistics.median(reads):.2f} | "
            f"{base / 2**30:.2f} | {extra:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"])
    parser.add_argument("--dir", default=str(ROOT / "bench" / "models"))
    parser.add_argument("--repeats", type=int, default=5, help="swaps timed after the first (default 5)")
    args = parser.parse_args()
    print("| arch | load model s | first merge + swap s | later swaps s, median (best) | restore s | "
          "read A+B s, median (best) | later swap ÷ read | RSS with model GiB | peak extra RAM MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        print(measure(arch, Path(args.dir), args.repeats), flush=True)


if __name__ == "__main__":
    main()
