"""Merging end to end: open the inputs, plan, stream, write.

Example:
    >>> recipe = Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3)
    >>> result = merge_to_file(recipe, "out.safetensors")
    >>> result.seconds
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergers.chain import RecipeCheckpoint, input_files, opened_sources, portable_recipe
from mergers.engine import CancelToken, OutFor, ProgressCallback, run_plan
from mergers.errors import CheckpointError
from mergers.licenses import terms_of_sources
from mergers.metadata import RECIPE_KEY, merge_metadata
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
def open_sources(recipe: Recipe, resolve: Resolver = resolve_path, *,
                 device: Optional[str] = None) -> Iterator[Sources]:
    """Open the recipe's input files (and the VAE to bake), closing them afterwards. A chained
    input (a nested recipe, or a saved ``NAME.recipe.json``) opens as a virtual checkpoint
    whose keys are merged on ``device`` as they are read (mergers/chain.py).

    Example:
        >>> with open_sources(recipe) as sources:
        ...     plan = plan_merge(recipe, sources)
    """
    with opened_sources(recipe, resolve, device=device) as sources:
        yield sources


def merge_to_file(recipe: Recipe, output: str | os.PathLike, *, resolve: Resolver = resolve_path,
                  device: Optional[str] = None, overwrite: bool = False,
                  on_progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None, allow_non_finite: bool = False) -> MergeResult:
    """Merge per ``recipe`` and save the result as safetensors (atomically).

    A merged key holding NaN or Inf refuses the save (``NonFiniteError`` naming the key, nothing is
    written) unless ``allow_non_finite``: then it is written and listed in ``MergeResult.warnings``.

    Example:
        >>> merge_to_file(Recipe(model_a="a.safetensors", model_b="b.safetensors"), "ab.safetensors")
        MergeResult(path=PosixPath('ab.safetensors'), ...)
    """
    started = time.perf_counter()
    warnings: list[str] = []
    with open_sources(recipe, resolve, device=device) as sources:
        plan = plan_merge(recipe, sources)
        placeholders = _hash_placeholders(sources)
        terms = terms_of_sources(sources).metadata()  # read once: the hash rewrite must keep its size
        metadata = {**_metadata(plan, sources, digest=lambda c: placeholders.get(id(c)) or c.sha256()), **terms}
        protect = [c.path for c in (*input_files(sources).values(), sources.vae) if c is not None]
        with SafetensorsWriter(output, plan.specs, metadata=metadata, overwrite=overwrite, protect=protect,
                               reserve=HASH_SLACK if placeholders else 0) as out:
            with BackgroundWrites(out) as writes:
                for key, tensor in run_plan(plan, sources, device=device, on_progress=on_progress, cancel=cancel,
                                            warnings=warnings, allow_non_finite=allow_non_finite):
                    writes.write(key, tensor)
            if placeholders:  # the reads are done, so are the hashes
                metadata = {**_metadata(plan, sources), **terms}
                out.rewrite_metadata(metadata)
    return MergeResult(Path(output), plan, metadata, time.perf_counter() - started, tuple(warnings))


# Room for a header rewrite whose hashes may dedupe differently than the placeholders did.
HASH_SLACK = 1024


def _metadata(plan: MergePlan, sources: Sources, *, digest=None) -> dict[str, str]:
    """The merged file's metadata; a chained merge records its whole recipe tree and every file it read.
    (merge_to_file adds the combined license terms: ``modelspec.license``, ``supermerger_license``.)"""
    metadata = merge_metadata(plan, sources, digest=digest)
    if not any(isinstance(model, RecipeCheckpoint) for model in sources.models) and not sources.more:
        return metadata
    ours = json.loads(metadata[RECIPE_KEY])
    ours["recipe"] = portable_recipe(plan.recipe, sources).to_dict()
    digest = digest or (lambda ckpt: ckpt.sha256())
    ours["models"] = {role: {"name": c.name, "sha256": digest(c)} for role, c in input_files(sources).items()}
    return {**metadata, RECIPE_KEY: json.dumps(ours, ensure_ascii=False)}


def _hash_placeholders(sources: Sources) -> dict[int, str]:
    """Inputs whose sha256 is not cached are hashed from the merge's own reads (one pass over
    the file instead of two); until then their metadata holds a same-length placeholder."""
    inputs = list({id(c): c for c in (*sources.models, *input_files(sources).values())}.values())
    return {id(c): f"{n:064x}" for n, c in enumerate(inputs, start=1) if c.hash_while_reading()}


def merge_stream(recipe: Recipe, *, resolve: Resolver = resolve_path, device: Optional[str] = None,
                 output_device: str = "cpu", on_progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, out_for: Optional[OutFor] = None,
                 allow_non_finite: bool = False) -> Iterator[tuple[str, "object"]]:
    """Merge per ``recipe`` and yield ``(key, tensor)`` pairs, e.g. to copy into a loaded model
    (``out_for``, and a NaN/Inf key's ``NonFiniteError`` or ``allow_non_finite``: see ``run_plan``).

    Example:
        >>> for key, tensor in merge_stream(recipe):
        ...     params[key].copy_(tensor)
    """
    with open_sources(recipe, resolve, device=device) as sources:
        plan = plan_merge(recipe, sources)
        yield from run_plan(plan, sources, device=device, output_device=output_device,
                            on_progress=on_progress, cancel=cancel, out_for=out_for,
                            allow_non_finite=allow_non_finite)
