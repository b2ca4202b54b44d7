"""Merging end to end: open the inputs, plan, stream, write.

Example:
    >>> recipe = Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3)
    >>> result = merge_to_file(recipe, "out.safetensors")
    >>> result.seconds
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergers.checkpoint import open_checkpoint
from mergers.engine import CancelToken, ProgressCallback, run_plan
from mergers.errors import CheckpointError
from mergers.metadata import merge_metadata
from mergers.plan import MergePlan, Sources, plan_merge
from mergers.recipe import Recipe
from mergers.writer import BackgroundWrites, SafetensorsWriter

Resolver = Callable[[str], Path]


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge to a file reports."""

    path: Path
    plan: MergePlan
    metadata: dict[str, str]
    seconds: float
    warnings: tuple[str, ...] = ()


def resolve_path(name: str) -> Path:
    """The default model resolver: the name is a path to a checkpoint file."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{name}: no such checkpoint file")
    return path


@contextlib.contextmanager
def open_sources(recipe: Recipe, resolve: Resolver = resolve_path) -> Iterator[Sources]:
    """Open the recipe's input files (and the VAE to bake), closing them afterwards.

    Example:
        >>> with open_sources(recipe) as sources:
        ...     plan = plan_merge(recipe, sources)
    """
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_checkpoint(resolve(name))) for name in recipe.models]
        vae = stack.enter_context(open_checkpoint(resolve(recipe.bake_vae))) if recipe.bake_vae else None
        yield Sources(*opened, *([None] * (3 - len(opened))), vae=vae)


def merge_to_file(recipe: Recipe, output: str | os.PathLike, *, resolve: Resolver = resolve_path,
                  device: Optional[str] = None, overwrite: bool = False,
                  on_progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> MergeResult:
    """Merge per ``recipe`` and save the result as safetensors (atomically).

    Example:
        >>> merge_to_file(Recipe(model_a="a.safetensors", model_b="b.safetensors"), "ab.safetensors")
        MergeResult(path=PosixPath('ab.safetensors'), ...)
    """
    started = time.perf_counter()
    warnings: list[str] = []
    with open_sources(recipe, resolve) as sources:
        plan = plan_merge(recipe, sources)
        placeholders = _hash_placeholders(sources)
        metadata = merge_metadata(plan, sources, digest=lambda c: placeholders.get(id(c)) or c.sha256())
        protect = [c.path for c in (sources.a, sources.b, sources.c, sources.vae) if c is not None]
        with SafetensorsWriter(output, plan.specs, metadata=metadata, overwrite=overwrite, protect=protect,
                               reserve=HASH_SLACK if placeholders else 0) as out:
            with BackgroundWrites(out) as writes:
                for key, tensor in run_plan(plan, sources, device=device, on_progress=on_progress, cancel=cancel,
                                            warnings=warnings):
                    writes.write(key, tensor)
            if placeholders:  # the reads are done, so are the hashes
                metadata = merge_metadata(plan, sources)
                out.rewrite_metadata(metadata)
    return MergeResult(Path(output), plan, metadata, time.perf_counter() - started, tuple(warnings))


# Room for a header rewrite whose hashes may dedupe differently than the placeholders did.
HASH_SLACK = 1024


def _hash_placeholders(sources: Sources) -> dict[int, str]:
    """Inputs whose sha256 is not cached are hashed from the merge's own reads (one pass over
    the file instead of two); until then their metadata holds a same-length placeholder."""
    inputs = [c for c in (sources.a, sources.b, sources.c) if c is not None]
    return {id(c): f"{n:064x}" for n, c in enumerate(inputs, start=1) if c.hash_while_reading()}


def merge_stream(recipe: Recipe, *, resolve: Resolver = resolve_path, device: Optional[str] = None,
                 output_device: str = "cpu", on_progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> Iterator[tuple[str, "object"]]:
    """Merge per ``recipe`` and yield ``(key, tensor)`` pairs, e.g. to copy into a loaded model.

    Example:
        >>> for key, tensor in merge_stream(recipe):
        ...     params[key].copy_(tensor)
    """
    with open_sources(recipe, resolve) as sources:
        plan = plan_merge(recipe, sources)
        yield from run_plan(plan, sources, device=device, output_device=output_device,
                            on_progress=on_progress, cancel=cancel)
