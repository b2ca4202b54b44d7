"""Planning a merge from the headers alone, before any tensor is read.

The plan decides, key by key, what the output holds (merged, copied from A or
B, a baked VAE tensor, fresh CLIP ids), with which ratio and in which dtype and
shape. Every check that can fail (architectures, shapes, weight strings) fails
here, so a bad merge stops before any work is done.

Which keys merge follows the original's ``smerge`` (reference §1.3): a key of
A merges when its name holds "model" and "weight" or "bias", B (and C, for
three-model modes) have it, and its block is merged at all; every other key
stays as in A. Keys only B has (and that hold "model") are copied from B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import torch

from mergers.adjust import Adjust, adjust_for_key, parse_adjust
from mergers.arch import (
    Architecture,
    block_ids,
    block_of,
    detect_architecture,
    fine_block_of,
    key_fingerprint,
    layout_named,
    merges_by_name,
)
from mergers.checkpoint import Checkpoint
from mergers.dice import roll
from mergers.elemental import ElementalRule, elemental_ratio, parse_elemental, uses_random
from mergers.errors import ArchitectureError
from mergers.keyfilter import KeyFilter, parse_key_filter, stays_as_a
from mergers.methods import MergeMethod
from mergers.recipe import Recipe, resolve_seed, takes_any_number
from mergers.weights import BlockWeights, parse_weights
from mergers.writer import TensorSpec, cast_for_output, output_dtype

CLIP_IDS_KEY = "cond_stage_model.transformer.text_model.embeddings.position_ids"
# The original never copies these from B (CHCKPOINT_DICT_SKIP_ON_MERGE).
SKIP_FROM_B = frozenset({CLIP_IDS_KEY})
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class Sources:
    """The opened input files of one merge."""

    a: Checkpoint
    b: Checkpoint
    c: Optional[Checkpoint] = None
    vae: Optional[Checkpoint] = None
    more: tuple[Checkpoint, ...] = ()  # models D, E, … for methods that take any number

    @property
    def models(self) -> tuple[Checkpoint, ...]:
        """Every input model, A first (the VAE to bake is not one)."""
        return tuple(m for m in (self.a, self.b, self.c, *self.more) if m is not None)


@dataclass(frozen=True)
class KeyStep:
    """What to do for one output key."""

    spec: TensorSpec  # the output key, dtype and shape
    action: str  # "merge" | "copy_a" | "copy_b" | "vae" | "clip_ids"
    block: Optional[str] = None
    alpha: float = 0.0
    beta: float = 0.0
    channels: Optional[int] = None  # inpainting A: merge only [:, :channels]
    adjust: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the Adjust change, after merging

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass(frozen=True)
class MergePlan:
    """Every output key's step, plus what they were derived from."""

    recipe: Recipe
    method: MergeMethod
    arch: Architecture
    steps: tuple[KeyStep, ...]
    weights_alpha: Optional[BlockWeights] = None
    weights_beta: Optional[BlockWeights] = None
    prepass_keys: tuple[str, ...] = ()  # keys a statistics pass reads first (cosineA/B)
    key_filter: KeyFilter = KeyFilter()
    input_count: int = 2  # the models each merged key reads: the method's count, or all for N-model methods
    missing: tuple[tuple[str, str], ...] = ()  # (key, model lacking it): keys of A kept as they are for that reason

    @property
    def specs(self) -> list[TensorSpec]:
        return [step.spec for step in self.steps]

    def count(self, action: str) -> int:
        return sum(step.action == action for step in self.steps)


def plan_merge(recipe: Recipe, sources: Sources) -> MergePlan:
    """Check the inputs against the recipe and plan every output key.

    Example:
        >>> plan = plan_merge(recipe, Sources(open_checkpoint(a), open_checkpoint(b)))
        >>> plan.count("merge")
        1130
    """
    recipe = resolve_seed(recipe)
    method = recipe.method
    _check_model_count(method, sources)
    method.check_bounds(gamma=recipe.gamma)
    arch = _common_architecture(sources)
    recipe = _checked_fingerprint(recipe, arch, sources)
    recipe, draw = _roll_dice(recipe, arch, sources.a)
    weights_alpha = _block_weights(recipe.weights_alpha, arch)
    weights_beta = _block_weights(recipe.weights_beta, arch) if method.uses_beta else None
    context = _Context(recipe, method, arch, sources, weights_alpha, weights_beta, output_dtype(recipe.dtype),
                       *_key_rules(recipe, arch), draw)
    steps = [step for key in sources.a if (step := _step_for_a_key(key, context))]
    steps += [_copy_from_b(key, context) for key in sources.b if _only_in_b(key, context)]
    return MergePlan(recipe, method, arch, tuple(steps), weights_alpha, weights_beta, _prepass_keys(context),
                     context.key_filter, len(context.merged_models), _missing_keys(steps, context))


def _missing_keys(steps: list[KeyStep], ctx: _Context) -> tuple[tuple[str, str], ...]:
    """(key, the model lacking it) for each key of A that would merge but another input does not have."""
    missing = []
    for step in steps:
        key = step.spec.key
        if step.action != "copy_a" or step.block is not None or block_of(key, ctx.arch.layout) is None:
            continue
        lacking = next((model.name for model in ctx.merged_models[1:] if key not in model), None)
        if lacking is not None and merges_by_name(key, ctx.arch.layout):
            missing.append((key, lacking))
    return tuple(missing)


MISSING_SHOWN = 5  # keys named when inputs lack keys of model A; the rest are counted


def missing_message(plan: MergePlan) -> str:
    """The keys of A kept because another input lacks them, by name ("" when there are none).

    Example:
        >>> missing_message(plan)
        'kept from model A, missing in another model: net.pos (b.safetensors)'
    """
    if not plan.missing:
        return ""
    shown = ", ".join(f"{key} ({model})" for key, model in plan.missing[:MISSING_SHOWN])
    more = f" and {len(plan.missing) - MISSING_SHOWN} more" if len(plan.missing) > MISSING_SHOWN else ""
    return f"kept from model A, missing in another model: {shown}{more}"


def _roll_dice(recipe: Recipe, arch: Architecture, model_a: Checkpoint) -> tuple[Recipe, Callable]:
    """Draw the dice's weights into the recipe, and the per-key draws for random elemental ratios.

    Element draws use a key's position in A's sorted key order: the original numbers
    keys as a safetensors state dict lists them, and that order is sorted.
    """
    rolled = roll(recipe.dice, arch.layout, weights_alpha=recipe.weights_alpha, weights_beta=recipe.weights_beta)
    elemental = ",".join(part for part in (recipe.elemental, rolled.elemental) if part)
    changed = (rolled.weights_alpha, rolled.weights_beta, elemental) != \
        (recipe.weights_alpha, recipe.weights_beta, recipe.elemental or "")
    if changed or (elemental and uses_random(parse_elemental(elemental, arch.layout,
                                                             extended=recipe.elemental_extended))):
        recipe = recipe.with_changes(weights_alpha=rolled.weights_alpha, weights_beta=rolled.weights_beta,
                                     elemental=elemental, dice=replace(recipe.dice, mode="off", seed=rolled.seed))
    index = {key: n for n, key in enumerate(sorted(model_a))}
    blocks = block_ids(arch.layout)

    def draw(letter: str, key: str, block: str) -> float:
        return rolled.element_draws.draw(letter, index[key], blocks.index(block))

    return recipe, draw


def _key_rules(recipe: Recipe, arch: Architecture) -> tuple:
    """Elemental rules, the include/exclude filter and Adjust, parsed (and so checked) up front."""
    layout = arch.layout
    elemental = parse_elemental(recipe.elemental, layout, extended=recipe.elemental_extended) \
        if recipe.elemental else ()
    key_filter = parse_key_filter(recipe.include_exclude, recipe.include_exclude_blocks or "",
                                  recipe.include_exclude_elements or "", layout=layout)
    return elemental, key_filter, parse_adjust(recipe.adjust)


@dataclass(frozen=True)
class _Context:
    recipe: Recipe
    method: MergeMethod
    arch: Architecture
    sources: Sources
    weights_alpha: Optional[BlockWeights]
    weights_beta: Optional[BlockWeights]
    out_dtype: Optional[torch.dtype]
    elemental: tuple[ElementalRule, ...] = ()
    key_filter: KeyFilter = KeyFilter()
    adjust: Optional[Adjust] = None
    draw: Optional[Callable[[str, str, str], float]] = None  # (letter, key, block) → a random ratio

    @property
    def merged_models(self) -> list[Checkpoint]:
        return list(merged_models(self.method, self.sources))


def merged_models(method: MergeMethod, sources: Sources) -> tuple[Checkpoint, ...]:
    """The inputs a merged key reads: the method's count, or every model for N-model methods."""
    return sources.models if takes_any_number(method) else (sources.a, sources.b, sources.c)[: method.models]


def _step_for_a_key(key: str, ctx: _Context) -> Optional[KeyStep]:
    a = ctx.sources.a
    if ctx.recipe.prune and not _kept_by_prune(key, ctx.arch):
        return None
    spec = TensorSpec(key, _out_dtype(a.dtype(key), ctx), a.shape(key))
    if ctx.recipe.reset_clip and key == CLIP_IDS_KEY:
        return KeyStep(TensorSpec(key, torch.int64, spec.shape), "clip_ids")
    if _baked_vae_key(key, ctx):
        return KeyStep(spec, "vae")
    block = block_of(key, ctx.arch.layout)
    if not _merges(key, block, ctx):
        return KeyStep(spec, "copy_a")
    fine = fine_block_of(key, ctx.arch.layout)
    if stays_as_a(ctx.key_filter, key, block, fine_block=fine):
        return KeyStep(spec, "copy_a", block)
    channels = _merge_channels(key, ctx)
    alpha = _ratio(ctx.weights_alpha, block, ctx.recipe.alpha)
    if ctx.elemental:  # overrides the block ratio of alpha, as in the original
        draw = (lambda letter: ctx.draw(letter, key, block)) if ctx.draw else None
        alpha = elemental_ratio(ctx.elemental, key, block, alpha, fine_block=fine, draw=draw)
    beta = _ratio(ctx.weights_beta, block, ctx.recipe.beta)
    ctx.method.check_bounds(alpha=alpha, beta=beta)
    adjust = adjust_for_key(ctx.adjust, key, ctx.arch.layout) if ctx.adjust else None
    return KeyStep(spec, "merge", block, alpha, beta, channels, adjust)


def _merges(key: str, block: Optional[str], ctx: _Context) -> bool:
    if block is None or not merges_by_name(key, ctx.arch.layout):
        return False
    if not ctx.sources.a.dtype(key).is_floating_point:  # step counters and ids are copied, never blended
        return False
    if ctx.method.skips(key):
        return False
    return all(key in model for model in ctx.merged_models[1:])


def _prepass_keys(ctx: _Context) -> tuple[str, ...]:
    """Keys of A and B with equal shapes that the method's statistics pass wants."""
    prepass, a, b = ctx.method.prepass, ctx.sources.a, ctx.sources.b
    if prepass is None:
        return ()
    return tuple(key for key in a if key in b and _prepass_wants(key, ctx) and a.shape(key) == b.shape(key))


def _prepass_wants(key: str, ctx: _Context) -> bool:
    """The method's own test; bare diffusion keys of layouts the original never had count as model keys.

    The original's statistics take keys holding "model"; Qwen-Image or an automatic layout ships
    ``transformer_blocks.0…`` with no "model" in any name, which would leave cosineA without statistics.
    """
    prepass = ctx.method.prepass
    if prepass.wants(key):
        return True
    original = layout_named(ctx.arch.layout).name_needs_weight  # SD1/SDXL/Flux/SD3 keep the original's test
    if original or not ctx.sources.a.dtype(key).is_floating_point:
        return False
    return block_of(key, ctx.arch.layout) is not None and prepass.wants(f"model.{key}")


def _only_in_b(key: str, ctx: _Context) -> bool:
    if key in ctx.sources.a or key in SKIP_FROM_B or "model" not in key:
        return False
    return not ctx.recipe.prune or _kept_by_prune(key, ctx.arch)


def _copy_from_b(key: str, ctx: _Context) -> KeyStep:
    b = ctx.sources.b
    return KeyStep(TensorSpec(key, _out_dtype(b.dtype(key), ctx), b.shape(key)), "copy_b")


def _ratio(weights: Optional[BlockWeights], block: Optional[str], scalar: float) -> float:
    return weights.value_of(block) if weights is not None and block is not None else scalar


def _out_dtype(dtype: torch.dtype, ctx: _Context) -> torch.dtype:
    return cast_for_output(torch.empty((), dtype=dtype), ctx.out_dtype).dtype


def _kept_by_prune(key: str, arch: Architecture) -> bool:
    # The refiner shares SD1's block layout but keeps its text encoder under "conditioner."
    keep = layout_named("sdxl" if arch.family == "sdxl_refiner" else arch.layout).prune_keep
    return not keep or any(part in key for part in keep)  # layouts without a list keep every key


def _baked_vae_key(key: str, ctx: _Context) -> bool:
    vae = ctx.sources.vae
    if vae is None or not key.startswith(VAE_PREFIX):
        return False
    inner = key[len(VAE_PREFIX):]
    if inner not in vae:
        return False
    if tuple(vae.shape(inner)) != tuple(ctx.sources.a.shape(key)):
        raise ArchitectureError(
            f"VAE {vae.name}: {inner!r} has shape {list(vae.shape(inner))}, "
            f"model A's {key!r} has {list(ctx.sources.a.shape(key))}; is it a VAE for this architecture?"
        )
    return True


def _merge_channels(key: str, ctx: _Context) -> Optional[int]:
    """None when the shapes agree; the common channel count for an inpainting/pix2pix A."""
    models = ctx.merged_models
    shape_a = tuple(models[0].shape(key))
    others = [tuple(m.shape(key)) for m in models[1:]]
    if all(shape == shape_a for shape in others):
        return None
    if all(_differs_in_channels_only(shape_a, shape) for shape in others):
        return min(shape[1] for shape in [shape_a, *others])
    culprit = next(m for m in models[1:] if tuple(m.shape(key)) != shape_a)
    raise ArchitectureError(
        f"{key!r} has shape {list(shape_a)} in model A ({models[0].name}) but "
        f"{list(culprit.shape(key))} in {culprit.name}; these models cannot be merged"
    )


def _differs_in_channels_only(shape_a: tuple, shape: tuple) -> bool:
    """Inpainting (9) and instruct-pix2pix (8) inputs differ from 4-channel models in dim 1 only."""
    if len(shape_a) < 2 or len(shape) != len(shape_a) or shape_a[:1] + shape_a[2:] != shape[:1] + shape[2:]:
        return False
    if shape[1] > shape_a[1]:
        kind = "inpainting" if shape[1] == 9 else "instruct-pix2pix" if shape[1] == 8 else "wider"
        raise ArchitectureError(
            f"when merging an {kind} model with a normal one, model A must be the {kind} model "
            f"(A has {shape_a[1]} input channels, another model has {shape[1]})"
        )
    return True


def _check_model_count(method: MergeMethod, sources: Sources) -> None:
    if method.models == 3 and sources.c is None:
        raise ArchitectureError(f"{method.label!r} needs model C")
    if len(sources.models) < method.models:
        raise ArchitectureError(f"{method.label!r} needs at least {method.models} models, got {len(sources.models)}")


def _common_architecture(sources: Sources) -> Architecture:
    models = list(sources.models)
    archs = [detect_architecture(m.shapes, m.metadata, source=m.name) for m in models]
    for model, arch in zip(models[1:], archs[1:]):
        if not arch.known and not archs[0].known:
            continue  # unknown models merge key by key: missing keys and other shapes are handled per key
        if arch.layout != archs[0].layout or arch.family != archs[0].family:
            raise ArchitectureError(
                f"model A ({models[0].name}) is {archs[0].label} but {model.name} is {arch.label}; "
                "merge models of the same architecture"
            )
    return archs[0]


def models_fingerprint(sources: Sources) -> str:
    """Every input's key fingerprint (names and shapes), comma-separated in model order.

    Example:
        >>> models_fingerprint(Sources(open_checkpoint("a.safetensors"), open_checkpoint("b.safetensors")))
        '3f9c0a1b2c3d4e5f,3f9c0a1b2c3d4e5f'
    """
    return ",".join(key_fingerprint(model.shapes) for model in sources.models)


def _checked_fingerprint(recipe: Recipe, arch: Architecture, sources: Sources) -> Recipe:
    """Check a recorded fingerprint against the inputs; record one for a model no layout file describes.

    An unknown model's blocks come from its keys, so a replay must read files with the same keys.
    """
    found = models_fingerprint(sources)
    if recipe.key_fingerprint is not None and recipe.key_fingerprint != found:
        differing = [model.name for model, old, new in zip(sources.models, recipe.key_fingerprint.split(","),
                                                            found.split(",")) if old != new] or ["the model count"]
        raise ArchitectureError(
            f"the recipe was made from files with other keys: {', '.join(differing)} differ from the recorded "
            f"key fingerprint ({recipe.key_fingerprint} now {found}); merge the files the recipe names"
        )
    return recipe if arch.known or recipe.key_fingerprint else recipe.with_changes(key_fingerprint=found)


def _block_weights(text: Optional[str], arch: Architecture) -> Optional[BlockWeights]:
    return None if text is None else parse_weights(text, arch.layout)
