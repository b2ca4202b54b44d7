"""Time the checkpoint read path: every tensor of a file read into pooled buffers, as a merge reads.

Runs the same code under any Python: Linux (native ``preadv``), Linux with the Windows fallback
forced (seek + read under a lock), and a Windows CPython under Wine (``make test-windows`` builds one).
The file is read once untimed first, so every run reads from the page cache. Prints one JSON line.

Example:
    python bench/make_models.py --arch sd1 --models a
    .venv/bin/python bench/read_path.py bench/models/sd1_a.safetensors
    .venv/bin/python bench/read_path.py bench/models/sd1_a.safetensors --fallback
    bash .ci/wine .venv-win bench/read_path.py bench/models/sd1_a.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mergers.checkpoint import BufferPool, open_checkpoint  # noqa: E402
from mergers.fileio import positional_calls_native, use_positional_calls  # noqa: E402


def read_all(path: Path) -> int:
    pool = BufferPool(keep_bytes=256 << 20)
    total = 0
    with open_checkpoint(path) as ckpt:
        for key in ckpt:
            total += ckpt.read(key, pool=pool).numel() * ckpt.dtype(key).itemsize
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--fallback", action="store_true", help="force the seek+read path Windows uses")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    native = positional_calls_native() and not args.fallback
    with use_positional_calls(native):
        read_all(args.file)  # warm the page cache
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            size = read_all(args.file)
            times.append(time.perf_counter() - started)
    best = min(times)
    print(json.dumps({"os": platform.system() or os.name, "native_pread": native, "bytes": size,
                      "best_s": round(best, 3), "median_s": round(sorted(times)[len(times) // 2], 3),
                      "GB_per_s": round(size / best / 1e9, 2)}))


if __name__ == "__main__":
    main()
