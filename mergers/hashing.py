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
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    cache = _load_cache()
    entry = cache.get(str(path))
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = _hash_whole_file(path)
    cache[str(path)] = {"stamp": stamp, "sha256": digest}
    _store_cache(cache)
    return digest


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
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(cache: dict) -> None:
    target = _cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(cache))
        os.replace(temp, target)
    except OSError as error:  # a read-only home must not stop a merge
        log.warning("could not write the hash cache %s: %s", target, error)
