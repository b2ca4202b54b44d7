"""Chained recipes: another recipe's result as a model, merged key by key on demand.

A model slot of a Recipe may hold another Recipe (or name a saved ``NAME.recipe.json``,
a "virtual checkpoint"). ``open_model`` opens such a slot as a :class:`RecipeCheckpoint`:
the same read-only interface as a checkpoint file (keys, shapes, dtypes, metadata, read
one tensor), planned from its inputs' headers alone, whose tensor read computes that one
key of the inner merge. The outer plan and executor are unchanged, so a chain runs in one
streaming pass per key: no intermediate model is written to disk or held in memory.

Example:
    >>> inner = Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3)
    >>> outer = Recipe(model_a=inner, model_b="c.safetensors", model_c="d.safetensors", mode="Add difference")
    >>> merge_to_file(outer, "out.safetensors")        # (A ⊕ B) + (C − D), in one pass
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import torch

from mergers.checkpoint import Checkpoint, open_checkpoint
from mergers.engine import PooledInputs, compute_step, resolve_device, run_prepass, step_inputs
from mergers.errors import CheckpointError, RecipeError
from mergers.methods import MODES
from mergers.models import VIRTUAL_SUFFIX
from mergers.plan import Sources, plan_merge
from mergers.recipe import MAX_CHAIN_DEPTH, MODEL_SLOTS, Recipe

Resolver = Callable[[str], Path]
Slot = Union[str, Recipe]

# A virtual checkpoint's metadata keeps its model A's, minus the merge records and license that describe A, not it.
MERGE_RECORD_KEYS = ("supermerger_recipe", "sd_merge_recipe", "sd_merge_models", "mecha_recipe",
                     "supermerger_license", "modelspec.license")


def is_virtual_checkpoint(path: Path) -> bool:
    """True for a saved recipe that stands in for a checkpoint (``NAME.recipe.json``)."""
    return path.name.lower().endswith(VIRTUAL_SUFFIX)


def load_recipe_file(path: Path) -> Recipe:
    """The Recipe saved in a ``.recipe.json`` file, with errors naming the file.

    Example:
        >>> load_recipe_file(Path("models/AB.recipe.json")).mode
        'weight_sum'
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the recipe file ({error})") from None
    try:
        return Recipe.from_json(text)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


def open_model(slot: Slot, resolve: Resolver, *, device: Optional[str] = None,
               _chain: tuple[str, ...] = ()) -> Checkpoint:
    """Open a recipe's model slot: a checkpoint file, or a (saved) recipe as a virtual checkpoint.

    Example:
        >>> with open_model(inner_recipe, resolve_path) as ckpt:
        ...     w = ckpt["model.diffusion_model.out.2.weight"]      # computed on demand
    """
    if isinstance(slot, Recipe):
        return RecipeCheckpoint(slot, resolve, device=device, _chain=_chain)
    path = resolve(slot)
    if not is_virtual_checkpoint(path):
        return open_checkpoint(path)
    if str(path.resolve()) in _chain:
        raise RecipeError(f"{path.name}: recipe files refer to each other in a loop")
    return RecipeCheckpoint(load_recipe_file(path), _beside(path, resolve), path=path, device=device,
                            _chain=(*_chain, str(path.resolve())))


def _beside(recipe_file: Path, resolve: Resolver) -> Resolver:
    """A saved recipe's models are found as everywhere else, or else beside the recipe file."""
    def resolve_beside(name: str) -> Path:
        try:
            return resolve(name)
        except CheckpointError:
            candidate = recipe_file.parent / name
            if candidate.is_file():
                return candidate
            raise
    return resolve_beside


@contextlib.contextmanager
def opened_sources(recipe: Recipe, resolve: Resolver, *, device: Optional[str] = None,
                   _chain: tuple[str, ...] = ()):
    """Open every model of ``recipe`` (chained ones as virtual checkpoints) and its VAE to bake."""
    if len(_chain) > MAX_CHAIN_DEPTH:
        raise RecipeError(f"recipes are chained more than {MAX_CHAIN_DEPTH} deep")
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_model(slot, resolve, device=device, _chain=_chain))
                  for slot in recipe.models]
        vae = stack.enter_context(open_checkpoint(resolve(recipe.bake_vae))) if recipe.bake_vae else None
        a, b, c, *more = [*opened, *[None] * (3 - len(opened))]
        yield Sources(a, b, c, vae=vae, more=tuple(more))


class RecipeCheckpoint(Checkpoint):
    """A recipe's result as a read-only checkpoint: each tensor is merged when it is read.

    Planned from the inputs' headers when opened (so a bad inner recipe fails before any
    work); holds nothing but the tensors of the key being read.
    """

    def __init__(self, recipe: Recipe, resolve: Resolver, *, path: Optional[Path] = None,
                 device: Optional[str] = None, _chain: tuple[str, ...] = ()):
        self._stack = contextlib.ExitStack()
        try:
            # One more level of chain ("" names no file: only the depth limit counts it).
            self.sources = self._stack.enter_context(
                opened_sources(recipe, resolve, device=device, _chain=(*_chain, "")))
            self.plan = plan_merge(recipe, self.sources)
        except BaseException:
            self._stack.close()
            raise
        self._steps = {step.key: step for step in self.plan.steps}
        self._infos = {step.key: _Info(step.spec.dtype, tuple(step.spec.shape)) for step in self.plan.steps}
        self._device = resolve_device(device)
        self._stats: Optional[dict] = None
        self._stats_lock = threading.Lock()
        self._label = path.name if path else describe(recipe)
        metadata = {k: v for k, v in self.sources.a.metadata.items() if k not in MERGE_RECORD_KEYS}
        super().__init__(path or Path(_safe_file_name(self._label)), metadata)

    @property
    def name(self) -> str:
        return self._label

    @property
    def recipe(self) -> Recipe:
        """The inner recipe as it runs (seed and dice resolved), its models by portable name."""
        return portable_recipe(self.plan.recipe, self.sources)

    def step(self, key: str):
        """The inner plan's step that computes ``key``."""
        return self._steps[key]

    def leaves(self) -> list[Checkpoint]:
        """The checkpoint files this virtual checkpoint reads, chained ones followed through."""
        found = []
        for model in (*self.sources.models, self.sources.vae):
            if isinstance(model, RecipeCheckpoint):
                found += model.leaves()
            elif model is not None:
                found.append(model)
        return found

    def _read(self, key: str, pool=None) -> torch.Tensor:
        step = self._steps[key]
        tensors = [_read_input(model, name, pool) for model, name in
                   step_inputs(step, self.sources, self.plan.input_count)]
        if pool is not None:  # the inner merge's results and fp8 widening use the same reused buffers
            tensors = PooledInputs(tensors, pool)
        return compute_step(self.plan, step, tensors, self._device, self._statistics()).to("cpu")

    def _statistics(self) -> dict:
        """Whole-model statistics of the inner method (cosineA/B), gathered once, on first read."""
        if not self.plan.method.prepass:
            return {}
        with self._stats_lock:
            if self._stats is None:
                self._stats = run_prepass(self.plan, self.sources, self._device, _Unreported())
        return self._stats

    @property
    def bytes_read(self) -> int:
        return sum(getattr(leaf, "bytes_read", 0) for leaf in self.leaves())

    def sha256(self) -> str:
        """An identity of this merge (not of a file: there is none): its recipe and its inputs' sha256."""
        if self._sha256 is None:
            identity = {"recipe": self.recipe.to_dict(), "inputs": [leaf.sha256() for leaf in self.leaves()]}
            self._sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return self._sha256

    def hash_while_reading(self) -> bool:
        return any([leaf.hash_while_reading() for leaf in self.leaves()])  # a list: ask every leaf

    def legacy_hash(self) -> str:
        return self.sha256()[:8]

    def close(self) -> None:
        self._stack.close()


class _Info:
    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, shape


class _Unreported:
    """Progress of an inner statistics pass: the outer merge's own progress covers it."""

    def check(self, key: str) -> None:
        pass

    def advance(self, key: str) -> None:
        pass


def _read_input(model: Checkpoint, key: str, pool) -> torch.Tensor:
    reader = getattr(model, "read", None)
    return reader(key, pool=pool) if pool is not None and reader is not None else model[key]


def portable_recipe(recipe: Recipe, sources: Sources) -> Recipe:
    """``recipe`` with each model slot as the opened input's file name, or its inner recipe inlined.

    Example:
        >>> portable_recipe(Recipe(model_a="/m/a.safetensors", model_b="/m/b.safetensors"), sources).model_a
        'a.safetensors'
    """
    names = [model.recipe if isinstance(model, RecipeCheckpoint) else model.name for model in sources.models]
    slots = dict(zip(MODEL_SLOTS, names[:3]))
    more = tuple(names[3:]) if recipe.more_models else ()
    return recipe.with_changes(**slots, more_models=more)


def input_files(sources: Sources) -> dict[str, Checkpoint]:
    """Every checkpoint file a merge reads, by role path (``model_a``, ``model_a.model_b``…)."""
    found: dict[str, Checkpoint] = {}
    roles = [*MODEL_SLOTS, *(f"more_models[{n}]" for n in range(len(sources.more)))]
    for role, model in zip(roles, sources.models):
        if isinstance(model, RecipeCheckpoint):
            found.update({f"{role}.{inner}": ckpt for inner, ckpt in input_files(model.sources).items()})
        else:
            found[role] = model
    return found


def leaf_names(recipe: Recipe) -> list[str]:
    """The model names a recipe reads, chained recipes followed through, A first.

    Example:
        >>> leaf_names(Recipe(model_a=Recipe(model_a="a", model_b="b"), model_b="c"))
        ['a', 'b', 'c']
    """
    names: list[str] = []
    for slot in recipe.models:
        names += leaf_names(slot) if isinstance(slot, Recipe) else [slot]
    return names


def describe(recipe: Recipe) -> str:
    """A short formula of a (chained) recipe: ``Weight sum(a, b; α=0.3)``.

    Example:
        >>> describe(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
        'Weight sum(a, b; α=0.3)'
    """
    parts = [describe(s) if isinstance(s, Recipe) else Path(s).name.removesuffix(".safetensors")
             for s in recipe.models]
    ratio = f"α={recipe.weights_alpha}" if recipe.weights_alpha else f"α={recipe.alpha:g}"
    calc = "" if recipe.calcmode == "normal" else f" {recipe.calcmode}"
    return f"{MODES[recipe.mode]}{calc}({', '.join(parts)}; {ratio})"


def _safe_file_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-() ,;=" else "_" for ch in text)[:200]
