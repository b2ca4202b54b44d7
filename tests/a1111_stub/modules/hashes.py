"""Stand-in for modules/hashes.py: sha256 of whole files, cached by title (A1111 keeps cache.json)."""

import hashlib
import os

cache_sha256 = {}  # title -> {"mtime": float, "sha256": str}


def calculate_sha256(filename):
    digest = hashlib.sha256()
    with open(filename, "rb") as file:
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_from_cache(filename, title, use_addnet_hash=False):
    """The cached sha256, or None when the file was never hashed (or changed since)."""
    entry = cache_sha256.get(title)
    if entry is None or entry["mtime"] < os.path.getmtime(filename):
        return None
    return entry["sha256"]


def sha256(filename, title, use_addnet_hash=False):
    """The file's sha256, hashing it (and caching the result) if needed."""
    cached = sha256_from_cache(filename, title)
    if cached is not None:
        return cached
    value = calculate_sha256(filename)
    cache_sha256[title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    return value
