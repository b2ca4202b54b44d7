"""What a checkpoint's header says: its elements (key, block, shape, dtype) and its metadata.

Only the header is read (for safetensors); nothing here touches tensor data. The merge recipe a
file carries, ours (``supermerger_recipe``) or A1111's and the original's (``sd_merge_recipe``),
is rendered as a few readable lines.

Example:
    >>> with open_checkpoint("merged.safetensors") as ckpt:
    ...     print(recipe_lines(ckpt.metadata, "sd1"))
    ['Weight sum: A x (1 - alpha) + B x alpha', 'model A: a.safetensors (sha256 0123456789)', ...]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from mergers.analysis.compare import analysis_block, component_of
from mergers.arch import detect_architecture
from mergers.checkpoint import Checkpoint
from mergers.errors import MergeError
from mergers.metadata import A1111_RECIPE_KEY, RECIPE_KEY
from mergers.recipe import Recipe
from mergers.weights import parse_weights

ELEMENT_HEADERS = ("No.", "block", "component", "key", "shape", "dtype")
SHORT_HASH = 10  # A1111's short hash: the sha256's first 10 hex digits
# Recipe fields shown in their own lines (models, method, weights), not among "other settings".
RECIPE_HEADLINE = {"model_a", "model_b", "model_c", "mode", "calcmode", "alpha", "beta", "weights_alpha",
                   "weights_beta"}


def element_rows(ckpt: Checkpoint, search: str = "") -> list[list[Any]]:
    """The checkpoint's keys as table rows (``ELEMENT_HEADERS``), those holding every word of ``search``.

    Example:
        >>> element_rows(ckpt, "attn2 out.0")[0][3]
        'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight'
    """
    layout = _layout(ckpt)
    words = search.lower().split()
    rows = []
    for number, key in enumerate(ckpt):
        if all(word in key.lower() for word in words):
            block = analysis_block(key, layout) if layout and component_of(key) else ""
            rows.append([number, block, component_of(key) or "", key, "x".join(map(str, ckpt.shape(key))),
                         str(ckpt.dtype(key)).replace("torch.", "")])
    return rows


def _layout(ckpt: Checkpoint) -> str | None:
    try:
        return detect_architecture(ckpt.shapes, ckpt.metadata, source=ckpt.name).layout
    except MergeError:
        return None  # an unknown architecture still lists its keys, without blocks


def metadata_view(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The safetensors metadata with values that hold JSON (recipes, model lists) decoded, for display.

    Example:
        >>> metadata_view({"format": "pt", "sd_merge_models": "{}"})
        {'format': 'pt', 'sd_merge_models': {}}
    """
    return {key: _decoded(value) for key, value in metadata.items()}


def _decoded(value: str) -> Any:
    if value[:1] not in ("{", "["):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def recipe_lines(metadata: Mapping[str, str], layout: str | None) -> list[str]:
    """The merge recipe stored in ``metadata`` as readable lines; [] when there is none.

    ``layout`` ("sd1"/"sdxl", the file's) names the values of block weights.

    Example:
        >>> recipe_lines({}, "sd1")
        []
    """
    if RECIPE_KEY in metadata:
        return _our_recipe_lines(_decoded(metadata[RECIPE_KEY]), layout)
    if A1111_RECIPE_KEY in metadata:
        return _a1111_recipe_lines(_decoded(metadata[A1111_RECIPE_KEY]))
    return []


def _our_recipe_lines(data: Any, layout: str | None) -> list[str]:
    try:
        recipe = Recipe.from_dict(data["recipe"])
    except (MergeError, KeyError, TypeError):
        return [f"{RECIPE_KEY} (unreadable): {str(data)[:500]}"]
    method = recipe.method
    lines = [f"{method.label}: {method.formula}" + ("" if recipe.calcmode == "normal" else f" ({recipe.calcmode})")]
    models = data.get("models", {}) if isinstance(data.get("models"), dict) else {}
    for role in ("model_a", "model_b", "model_c")[: method.models]:
        digest = str(models.get(role, {}).get("sha256", ""))[:SHORT_HASH]
        lines.append(f"model {role[-1].upper()}: {getattr(recipe, role)}" + (f" (sha256 {digest})" if digest else ""))
    for side in ("alpha", "beta") if method.uses_beta else ("alpha",):
        lines.append(_ratio_line(side, getattr(recipe, side), data.get(f"weights_{side}"), layout))
    lines += [f"{name}: {value}" for name, value in _changed_settings(recipe)]
    return lines


def _ratio_line(side: str, scalar: float, weights: str | None, layout: str | None) -> str:
    if not weights:
        return f"{side}: {scalar:g}"
    try:
        return f"{side} by block: {parse_weights(weights, layout).as_readable()}" if layout else f"{side}: {weights}"
    except MergeError:
        return f"{side} by block: {weights}"


def _changed_settings(recipe: Recipe) -> list[tuple[str, Any]]:
    """(field, value) of every setting that differs from a fresh recipe's, models and ratios aside."""
    default = Recipe(model_a=recipe.model_a, model_b=recipe.model_b)
    return [(f.name, getattr(recipe, f.name)) for f in fields(Recipe)
            if f.name not in RECIPE_HEADLINE and getattr(recipe, f.name) != getattr(default, f.name)]


def _a1111_recipe_lines(data: Any) -> list[str]:
    if not isinstance(data, dict):
        return [f"{A1111_RECIPE_KEY}: {data}"]
    return [f"{key}: {_short(value)}" for key, value in data.items() if value not in (None, "", [], [""])]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 300 else text[:300] + "…"
