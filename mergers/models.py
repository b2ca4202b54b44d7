"""Finding input models in a folder by name or by hash.

A stored recipe names its inputs by file name and sha256. On another machine
the files may be renamed, so a name match is checked against the hash, and
failing that every checkpoint in the folder is hashed (cached) to find it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from mergers.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from mergers.errors import CheckpointError
from mergers.hashing import sha256_of_file

CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# A saved recipe that stands in for a checkpoint (mergers/chain.py merges it on demand).
VIRTUAL_SUFFIX = ".recipe.json"


def list_checkpoints(folder: Path) -> Iterator[Path]:
    """Every checkpoint file under ``folder``, sorted, subfolders included.

    Example:
        >>> [p.name for p in list_checkpoints(Path("models"))]
        ['a.safetensors', 'b.safetensors']
    """
    return iter(sorted(p for p in folder.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()))


def list_virtual_checkpoints(folder: Path) -> Iterator[Path]:
    """Every saved recipe (``NAME.recipe.json``) under ``folder``, sorted: checkpoints without the gigabytes.

    Example:
        >>> [p.name for p in list_virtual_checkpoints(Path("models"))]
        ['ab.recipe.json']
    """
    return iter(sorted(p for p in folder.rglob("*" + VIRTUAL_SUFFIX) if p.is_file()))


def find_model(name: str, folder: Path, known: Mapping[str, Mapping[str, str]] | None = None) -> Path:
    """The file in ``folder`` that is the model ``name`` (checked by sha256 when known).

    Example:
        >>> find_model("a.safetensors", Path("models"), {"model_a": {"name": "a.safetensors", "sha256": "…"}})
        PosixPath('models/a.safetensors')
    """
    if name.lower().endswith(VIRTUAL_SUFFIX):  # a recipe has no file hash: found by name
        found = [p for p in list_virtual_checkpoints(folder) if p.name == Path(name).name]
        if found:
            return found[0]
        raise CheckpointError(f"saved recipe {name!r} not found in {folder}")
    wanted = _wanted_hash(name, known or {})
    by_name = [p for p in list_checkpoints(folder) if p.name == Path(name).name]
    for path in by_name:
        if wanted is None or sha256_of_file(path) == wanted:
            return path
    if wanted is not None:
        for path in list_checkpoints(folder):
            if sha256_of_file(path) == wanted:
                return path
    hint = f" (sha256 {wanted[:10]}…)" if wanted else ""
    raise CheckpointError(f"model {name!r}{hint} not found in {folder}")


def _wanted_hash(name: str, known: Mapping[str, Mapping[str, str]]) -> str | None:
    for entry in known.values():
        if entry.get("name") == Path(name).name and entry.get("sha256"):
            return entry["sha256"]
    return None
