"""The I/O floor of a merge: read the inputs, write one output-sized file.

Reads each input in turn with large ``readinto`` calls, then writes a file as
big as the first input with large writes and an fsync, like a merge that spends
no time computing. Run as a child process so its wall time and peak RSS can be
measured like a merge's.

Example:
    python bench/io_probe.py bench/out/io.bin bench/models/sd1_a.safetensors bench/models/sd1_b.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def read_file(path: Path, buffer: bytearray) -> int:
    """Read ``path`` start to end into ``buffer`` chunk by chunk; return the bytes read."""
    total = 0
    with open(path, "rb", buffering=0) as file:
        while got := file.readinto(buffer):
            total += got
    return total


def write_file(path: Path, size: int, buffer: bytearray) -> None:
    """Write ``size`` bytes from ``buffer`` (repeated) to ``path``, then fsync it."""
    view = memoryview(buffer)
    with open(path, "wb", buffering=0) as file:
        left = size
        while left:
            left -= file.write(view[:min(left, len(view))])
        os.fsync(file.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    buffer = bytearray(CHUNK)
    start = time.perf_counter()
    read = sum(read_file(path, buffer) for path in args.inputs)
    size = args.inputs[0].stat().st_size
    write_file(args.output, size, buffer)
    seconds = time.perf_counter() - start
    print(f"read {read / 1e9:.2f} GB, wrote {size / 1e9:.2f} GB in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
