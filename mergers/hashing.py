"""A1111-compatible file hashes, with a small on-disk cache.

A1111 names checkpoints by the sha256 of the whole file (its "short hash" is the
first 10 hex digits) and, in old infotexts, by a "legacy" 8-digit hash of 64 KiB
read at offset 1 MiB. Hashing a 7 GB file takes seconds, so results are cached
by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from mergers.fileio import pread

log = logging.getLogger(__name__)

CHUNK = 16 * 1024 * 1024  # large reads keep hashing near disk speed


def cache_dir() -> Path:
    """Where supermerger keeps caches: ``$SUPERMERGER_CACHE`` or ``~/.cache/supermerger``."""
    return Path(os.environ.get("SUPERMERGER_CACHE") or Path.home() / ".cache" / "supermerger")


def sha256_of_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, cached by (path, size, mtime).

    Example:
        >>> sha256_of_file("model.safetensors")[:10]
        '6ce0161689'
    """
    digest = cached_sha256(path)
    if digest is None:
        digest = _hash_whole_file(Path(path))
        remember_sha256(path, digest)
    return digest


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The cached sha256 of ``path`` if the file is unchanged since it was hashed, else None."""
    path = Path(path).resolve()
    entry = _load_cache().get(str(path))
    return entry["sha256"] if entry and entry.get("stamp") == _stamp(path) else None


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Cache ``digest`` as the sha256 of ``path`` as it is now."""
    path = Path(path).resolve()
    cache = _load_cache()
    cache[str(path)] = {"stamp": _stamp(path), "sha256": digest}
    _store_cache(cache)


class RunningHash:
    """The sha256 of a file, fed by the reads a merge does anyway (in file order).

    Bytes skipped between reads are read here; reads that go backwards are
    ignored (those bytes were hashed already or will be read at the end), so the
    file is read once in the common case instead of twice.
    """

    def __init__(self, fd: int, size: int):
        self._fd, self._size, self._position = fd, size, 0
        self._digest = hashlib.sha256()

    def feed(self, offset: int, data) -> None:
        if offset < self._position:
            return
        self._read_through(offset)
        self._digest.update(data)
        self._position = offset + len(memoryview(data).cast("B"))

    def hexdigest(self) -> str:
        self._read_through(self._size)
        return self._digest.hexdigest()

    def _read_through(self, end: int) -> None:
        while self._position < end:
            chunk = pread(self._fd, min(CHUNK, end - self._position), self._position)
            if not chunk:
                raise OSError(f"file shrank while hashing (at byte {self._position})")
            self._digest.update(chunk)
            self._position += len(chunk)


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's legacy model hash: sha256 of 64 KiB at offset 1 MiB, 8 hex digits.

    Example:
        >>> legacy_hash("model.safetensors")
        'e1441589'
    """
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def _hash_whole_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while got := file.readinto(buffer):
            digest.update(view[:got])
    return digest.hexdigest()


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _store_cache(cache: dict) -> None:
    target = _cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(temp, target)
    except OSError as error:  # a read-only home must not stop a merge
        log.warning("could not write the hash cache %s: %s", target, error)
