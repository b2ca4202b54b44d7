"""The metadata a merged file carries: our recipe, and A1111's keys.

- ``supermerger_recipe``: our versioned recipe JSON plus the inputs' names and
  hashes, and the block weights as resolved numbers (so a preset that changes
  later does not change what a re-run does);
- ``sd_merge_recipe`` / ``sd_merge_models``: the keys A1111 and the original
  SuperMerger write, so their tools read our files as theirs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from mergers.checkpoint import Checkpoint
from mergers.errors import RecipeError
from mergers.keyfilter import zeroed_weights
from mergers.methods import MODES
from mergers.plan import MergePlan, Sources
from mergers.recipe import Recipe
from mergers.weights import format_number

RECIPE_KEY = "supermerger_recipe"
A1111_RECIPE_KEY = "sd_merge_recipe"
A1111_MODELS_KEY = "sd_merge_models"
ROLES = ("model_a", "model_b", "model_c")


def merge_metadata(plan: MergePlan, sources: Sources, *,
                   digest: Optional[Callable[[Checkpoint], str]] = None) -> dict[str, str]:
    """All metadata for the merged file of ``plan``.

    Example:
        >>> meta = merge_metadata(plan, sources)
        >>> Recipe.from_dict(json.loads(meta["supermerger_recipe"])["recipe"]).mode
        'weight_sum'
    """
    inputs = _inputs(plan, sources)
    hashes = {role: digest(ckpt) if digest else ckpt.sha256() for role, ckpt in inputs.items()}
    return {
        "format": "pt",
        RECIPE_KEY: json.dumps(_our_recipe(plan, inputs, hashes), ensure_ascii=False),
        A1111_RECIPE_KEY: json.dumps(_a1111_recipe(plan, hashes), ensure_ascii=False),
        A1111_MODELS_KEY: json.dumps(_a1111_models(inputs, hashes), ensure_ascii=False),
    }


def stored_recipe(metadata: dict[str, str], *, source: str = "") -> tuple[Recipe, dict] | None:
    """The recipe and input hashes stored in a merged file's metadata, or None.

    Example:
        >>> recipe, models = stored_recipe(open_checkpoint("merged.safetensors").metadata)
        >>> models["model_a"]["sha256"][:10]
    """
    text = metadata.get(RECIPE_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
        return Recipe.from_dict(data["recipe"]), data.get("models", {})
    except (ValueError, KeyError, TypeError) as error:
        raise RecipeError(f"{source}: the stored recipe cannot be read ({error})") from None


def _inputs(plan: MergePlan, sources: Sources) -> dict[str, Checkpoint]:
    models = (sources.a, sources.b, sources.c)[: plan.method.models]
    return dict(zip(ROLES, models))


def _our_recipe(plan: MergePlan, inputs: dict[str, Checkpoint], hashes: dict[str, str]) -> dict:
    portable = plan.recipe.with_changes(**{role: ckpt.name for role, ckpt in inputs.items()})
    return {
        "recipe": portable.to_dict(),
        "models": {role: {"name": c.name, "sha256": hashes[role]} for role, c in inputs.items()},
        "architecture": plan.arch.label,
        "weights_alpha": plan.weights_alpha.as_text() if plan.weights_alpha else None,
        "weights_beta": plan.weights_beta.as_text() if plan.weights_beta else None,
    }


def _a1111_recipe(plan: MergePlan, hashes: dict[str, str]) -> dict:
    """The original's ``sd_merge_recipe`` fields, with its meanings."""
    recipe, wa, wb = plan.recipe, plan.weights_alpha, plan.weights_beta
    return {
        "type": "sd-webui-supermerger",
        "weights_alpha": list(wa.values[1:]) if wa else None,
        "weights_beta": list(wb.values[1:]) if wb else None,
        "weights_alpha_orig": _recorded(plan, wa),
        "weights_beta_orig": _recorded(plan, wb),
        "model_a": hashes["model_a"],
        "model_b": hashes["model_b"],
        "model_c": hashes.get("model_c", ""),
        "base_alpha": wa.values[0] if wa else recipe.alpha,
        "base_beta": wb.values[0] if wb else recipe.beta,
        "mode": MODES[recipe.mode],
        "mbw": wa is not None,
        "elemental_merge": _entries(recipe.elemental),
        "calcmode": recipe.calcmode,
        plan.key_filter.mode.capitalize(): [*plan.key_filter.blocks, *plan.key_filter.elements] or [""],
    }


def _recorded(plan: MergePlan, weights) -> str | None:
    """The weights as the original records them: blocks that include/exclude kept as A read 0."""
    if weights is None:
        return None
    keys = [step.key for step in plan.steps]
    values = zeroed_weights(plan.key_filter, weights.values, weights.layout, keys=keys) \
        if plan.key_filter.active else weights.values
    return ",".join(format_number(v) for v in values)


def _entries(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").replace("\n", ",").split(",") if part.strip()]


def _a1111_models(inputs: dict[str, Checkpoint], hashes: dict[str, str]) -> dict:
    """A1111's ``sd_merge_models``: every input by sha256, and the inputs' own merge history."""
    models: dict = {}
    for role, ckpt in inputs.items():
        models.update(_nested_models(ckpt))
        models[hashes[role]] = {"name": Path(ckpt.name).stem, "legacy_hash": ckpt.legacy_hash()}
    return models


def _nested_models(ckpt: Checkpoint) -> dict:
    try:
        nested = json.loads(ckpt.metadata.get(A1111_MODELS_KEY, "{}"))
    except ValueError:
        return {}
    return nested if isinstance(nested, dict) else {}
