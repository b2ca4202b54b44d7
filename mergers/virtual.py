"""Virtual checkpoints: a saved recipe (``NAME.recipe.json``) picked like a checkpoint.

A merge kept as its recipe costs a few kilobytes instead of 2–7 GB. The hosts list
these files beside the real checkpoints (``mergers.models.list_virtual_checkpoints``);
when one is picked as a model, ``mergers.chain.open_model`` opens it as a checkpoint
whose tensors are merged as they are read, so a merge into the loaded model, a save or
another merge uses it like a file.

Example:
    >>> path = save_virtual_checkpoint(recipe, Path("models/AB.recipe.json"))
    >>> with open_model(str(path), resolve_path) as ckpt:
    ...     ckpt["model.diffusion_model.out.2.weight"]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mergers.errors import OutputError
from mergers.models import VIRTUAL_SUFFIX
from mergers.recipe import Recipe


def virtual_file_name(name: str) -> str:
    """``name`` as a virtual checkpoint's file name: ``AB`` → ``AB.recipe.json``."""
    stem = name.strip().removesuffix(VIRTUAL_SUFFIX).removesuffix(".json")
    return f"{stem}{VIRTUAL_SUFFIX}"


def save_virtual_checkpoint(recipe: Recipe, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``recipe`` as a virtual checkpoint at ``path`` (atomically: a temp file, then rename).

    Example:
        >>> save_virtual_checkpoint(Recipe(model_a="a.safetensors", model_b="b.safetensors"), Path("m/ab.recipe.json"))
        PosixPath('m/ab.recipe.json')
    """
    path = Path(path)
    if not path.name.endswith(VIRTUAL_SUFFIX):
        raise OutputError(f"{path.name}: a virtual checkpoint's name ends in {VIRTUAL_SUFFIX}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; choose another name or overwrite it")
    handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=VIRTUAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(recipe.to_json())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
