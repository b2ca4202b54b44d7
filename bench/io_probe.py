"""The I/O floor of a merge: read the inputs, write one output-sized file.

Two access patterns, both with 16 MB ``readinto``/``write`` calls and a final
fsync, like a merge that spends no time computing:

- ``sequential``: read each input start to end, then write the output;
- ``interleaved``: step through all inputs side by side, writing an output
  chunk after each round of reads, as a streaming merge does (the kernel
  writes back while the next chunks are read).

Run as a child process so its wall time and peak RSS can be measured like a
merge's.

Example:
    python bench/io_probe.py out.bin a.safetensors b.safetensors --pattern interleaved
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


WRITE_BACK_LAG = 64 * 1024 * 1024
_written_back: dict[int, int] = {}  # file descriptor → where its write-back has started up to


def write_all(file, view: memoryview) -> None:
    """Write every byte of ``view`` (a raw file may write less than asked), then start the disk write
    of what lies ``WRITE_BACK_LAG`` behind, as mergers.writer.EarlyWriteBack does: the floor writes
    the way the merger writes, so neither is held back by a flush of gigabytes at the end."""
    while view:
        view = view[file.write(view):]
    start, end = _written_back.get(file.fileno(), 0), file.tell() - WRITE_BACK_LAG
    if end - start >= WRITE_BACK_LAG and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(file.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        _written_back[file.fileno()] = end


def write_file(path: Path, size: int, buffer: bytearray) -> None:
    """Write ``size`` bytes from ``buffer`` (repeated) to ``path``, then fsync it."""
    view = memoryview(buffer)
    with open(path, "wb", buffering=0) as file:
        left = size
        while left:
            step = min(left, len(view))
            write_all(file, view[:step])
            left -= step
        os.fsync(file.fileno())


def sequential(output: Path, inputs: list[Path]) -> str:
    """Read the inputs one after another, then write; report each phase's time."""
    buffer = bytearray(CHUNK)
    start = time.perf_counter()
    read = sum(read_file(path, buffer) for path in inputs)
    read_seconds = time.perf_counter() - start
    size = inputs[0].stat().st_size
    write_file(output, size, buffer)
    return (f"read {read / 1e9:.2f} GB in {read_seconds:.1f} s, then wrote {size / 1e9:.2f} GB in "
            f"{time.perf_counter() - start - read_seconds:.1f} s")


def interleaved(output: Path, inputs: list[Path]) -> str:
    """Read a chunk of every input, write a chunk of output, repeat; fsync at the end."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    size = inputs[0].stat().st_size
    files = [open(path, "rb", buffering=0) for path in inputs]
    read = written = 0
    try:
        with open(output, "wb", buffering=0) as out:
            while files:
                for file in list(files):
                    got = file.readinto(buffer)
                    read += got
                    if got < CHUNK:
                        file.close()
                        files.remove(file)
                step = min(CHUNK, size - written)
                write_all(out, view[:step])
                written += step
            while written < size:
                step = min(CHUNK, size - written)
                write_all(out, view[:step])
                written += step
            os.fsync(out.fileno())
    finally:
        for file in files:
            file.close()
    return f"read {read / 1e9:.2f} GB and wrote {written / 1e9:.2f} GB side by side"


PATTERNS = {"sequential": sequential, "interleaved": interleaved}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="sequential")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = PATTERNS[args.pattern](args.output, args.inputs)
    print(f"{args.pattern}: {summary}; {time.perf_counter() - start:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
