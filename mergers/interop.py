"""Merge recipes that other tools store in model files: read, show and re-run them.

Three formats besides our own ``supermerger_recipe`` (mergers/metadata.py):

- A1111's checkpoint merger (modules/extras.py ``run_modelmerger``): ``sd_merge_recipe`` with
  ``"type": "webui"``, models by sha256 (``primary/secondary/tertiary_model_hash``),
  ``interp_method`` ("Weighted sum", "Add difference", "No interpolation"), ``multiplier``;
  ``sd_merge_models`` maps every sha256 to ``{"name", "legacy_hash", "sd_merge_recipe"}``,
  the inputs' own entries merged in, so it holds the whole parent tree.
- The original SuperMerger: ``sd_merge_recipe`` with ``"type": "sd-webui-supermerger"``,
  models by sha256 in ``model_a/b/c``, the mode and calcmode labels, ``mbw`` with
  ``weights_alpha_orig``/``weights_beta_orig``, ``base_alpha``/``base_beta``,
  ``elemental_merge`` and an ``Include``/``Exclude`` entry.
- sd-mecha: ``mecha_recipe``, its ``.mecha`` text (``version 0.1.0`` then one instruction a
  line: ``model "path" …``, ``merge "method" &0 &1 alpha=0.5``, ``dict …``, ``&N`` citing
  line N). ``weighted_sum``, ``add_difference`` (of a ``subtract``) and ``slerp`` map onto
  our methods, nested merges onto chained recipes; anything else is reported as not mapped.

Example:
    >>> info = describe_stored_recipes(open_checkpoint("merged.safetensors").metadata)
    >>> info["a1111"]["summary"]
    'Weighted sum of A and B, multiplier 0.3'
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mergers.chain import describe
from mergers.errors import MergeError, RecipeError
from mergers.metadata import A1111_MODELS_KEY, A1111_RECIPE_KEY, stored_recipe
from mergers.recipe import Recipe

MECHA_KEY = "mecha_recipe"
A1111_TYPE = "webui"
ORIGINAL_TYPE = "sd-webui-supermerger"
A1111_METHODS = {"Weighted sum": "weight_sum", "Add difference": "add_difference"}
A1111_ROLES = (("primary_model_hash", "model_a"), ("secondary_model_hash", "model_b"),
               ("tertiary_model_hash", "model_c"))
ORIGINAL_KNOWN = {"type", "weights_alpha", "weights_beta", "weights_alpha_orig", "weights_beta_orig", "model_a",
                  "model_b", "model_c", "base_alpha", "base_beta", "mode", "mbw", "elemental_merge", "calcmode",
                  "Off", "Include", "Exclude"}
BLOCK_TOKEN = re.compile(r"^(BASE|IN\d+|M\d+|MID|OUT\d+|VAE|Adjust)$", re.IGNORECASE)
MAX_TREE_DEPTH = 32  # parent trees are flattened dicts: a cycle must not recurse forever


@dataclass
class Mapped:
    """One stored recipe as we read it: a Recipe where it maps, and what does not."""

    tool: str
    summary: str
    recipe: Optional[Recipe] = None
    models: dict = field(default_factory=dict)  # role → {"name", "sha256"}, to find the inputs
    cannot_map: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"tool": self.tool, "summary": self.summary,
                "recipe": self.recipe.to_dict() if self.recipe else None,
                "runnable": self.recipe is not None and not self.cannot_map, "cannot_map": self.cannot_map}


def describe_stored_recipes(metadata: dict[str, str]) -> dict:
    """Every merge recipe stored in a file's metadata, mapped onto ours where possible.

    Keys: ``supermerger``, ``sd-webui-supermerger`` (the original), ``a1111``, ``sd-mecha``
    (those present), each with a summary, our recipe (or None), whether it can be re-run and
    what cannot be mapped; ``parents`` is A1111's ``sd_merge_models`` tree.

    Example:
        >>> describe_stored_recipes({"sd_merge_recipe": '{"type": "webui", "interp_method": "Add difference", ...}'})
        {'a1111': {'tool': 'AUTOMATIC1111 checkpoint merger', ...}, 'parents': [...]}
    """
    found = {mapped_key(m): m.as_dict() for m in stored_recipes(metadata)}
    parents = parent_tree(metadata)
    if parents:
        found["parents"] = parents
    return found


def stored_recipes(metadata: dict[str, str]) -> list[Mapped]:
    """The recipes in ``metadata``, best first: ours, the original's, A1111's, sd-mecha's."""
    found = []
    try:
        ours = stored_recipe(metadata)
    except RecipeError as error:
        found.append(Mapped("supermerger", "supermerger recipe", cannot_map=[str(error).lstrip(": ")]))
        ours = None
    if ours is not None:
        found.append(Mapped("supermerger", f"supermerger recipe: {describe(ours[0])}", ours[0], ours[1]))
    raw = _json(metadata.get(A1111_RECIPE_KEY))
    if isinstance(raw, dict) and raw.get("type") == ORIGINAL_TYPE:
        found.append(from_original(raw, _models(metadata)))
    elif isinstance(raw, dict) and raw.get("type") == A1111_TYPE:
        found.append(from_a1111(raw, _models(metadata)))
    elif raw is not None:
        found.append(Mapped(f"unknown ({_text(raw)[:40]})", "a sd_merge_recipe of a tool we do not know",
                            cannot_map=[f"sd_merge_recipe type {_type_of(raw)!r} is not a format we read"]))
    if metadata.get(MECHA_KEY):
        found.append(from_mecha(metadata[MECHA_KEY]))
    return found


def mapped_key(mapped: Mapped) -> str:
    return {"AUTOMATIC1111 checkpoint merger": "a1111", "SuperMerger (original)": "sd-webui-supermerger",
            "sd-mecha": "sd-mecha"}.get(mapped.tool, mapped.tool)


def rerunnable_recipe(metadata: dict[str, str], *, source: str = "") -> tuple[Recipe, dict]:
    """The best stored recipe that maps fully onto ours, with its inputs' names and hashes.

    Example:
        >>> recipe, known = rerunnable_recipe(ckpt.metadata, source=ckpt.name)
        >>> merge_to_file(recipe, "again.safetensors", resolve=lambda n: find_model(n, folder, known))
    """
    recipes = stored_recipes(metadata)
    for mapped in recipes:
        if mapped.recipe is not None and not mapped.cannot_map:
            return mapped.recipe, mapped.models
    reasons = "; ".join(f"{m.tool}: {', '.join(m.cannot_map)}" for m in recipes if m.cannot_map)
    raise MergeError(f"{source}: no merge recipe that supermerger can re-run"
                     + (f" ({reasons})" if reasons else " (the file stores none)"))


# A1111 ---------------------------------------------------------------------------------

def from_a1111(raw: dict, models: dict) -> Mapped:
    """A1111's ``sd_merge_recipe`` (type "webui") as our recipe, where it maps."""
    method = raw.get("interp_method")
    mapped = Mapped("AUTOMATIC1111 checkpoint merger", f"{method} of "
                    f"{_names(raw, models)}, multiplier {raw.get('multiplier')}")
    if method not in A1111_METHODS:
        mapped.cannot_map.append(f"interp_method {method!r} (only {', '.join(A1111_METHODS)} merge models)")
    if raw.get("discard_weights"):
        mapped.cannot_map.append(f"discard_weights {raw['discard_weights']!r} (a regex of keys to drop)")
    roles = {role: raw.get(key) for key, role in A1111_ROLES if raw.get(key)}
    if method == "Weighted sum":
        roles.pop("model_c", None)  # A1111 records a tertiary model it does not use
    mapped.models = {role: {"name": _name_of(sha, models), "sha256": sha} for role, sha in roles.items()}
    if mapped.cannot_map:
        return mapped
    bake = raw.get("bake_in_vae")
    mapped.recipe = _recipe(mapped, mode=A1111_METHODS[method], alpha=raw.get("multiplier", 0.5),
                            dtype="fp16" if raw.get("save_as_half") else None,
                            bake_vae=bake if bake and bake != "None" else None)
    return mapped


# The original SuperMerger ---------------------------------------------------------------

def from_original(raw: dict, models: dict) -> Mapped:
    """The original SuperMerger's ``sd_merge_recipe`` as our recipe, where it maps."""
    mode = str(raw.get("mode") or "").split(":")[0].strip()
    mapped = Mapped("SuperMerger (original)", f"{mode} ({raw.get('calcmode') or 'normal'}) of {_names(raw, models)}")
    mapped.models = {role: {"name": _name_of(raw[role], models), "sha256": raw[role]}
                     for role in ("model_a", "model_b", "model_c") if raw.get(role)}
    unknown = sorted(set(raw) - ORIGINAL_KNOWN)
    if unknown:
        mapped.cannot_map.append(f"fields we do not know: {', '.join(unknown)}")
    options = dict(mode=mode, calcmode=raw.get("calcmode") or "normal", alpha=raw.get("base_alpha", 0.5),
                   beta=raw.get("base_beta", 0.25), elemental=_joined(raw.get("elemental_merge")))
    if raw.get("mbw"):
        options.update(weights_alpha=raw.get("weights_alpha_orig") or _joined(raw.get("weights_alpha")),
                       weights_beta=raw.get("weights_beta_orig") or _joined(raw.get("weights_beta")))
    options.update(_include_exclude(raw))
    if not mapped.cannot_map:
        mapped.recipe = _recipe(mapped, **options)
    return mapped


def _include_exclude(raw: dict) -> dict:
    for mode in ("Include", "Exclude"):
        entries = [str(e).strip() for e in raw.get(mode) or () if str(e).strip()]
        if entries:
            blocks = [e for e in entries if BLOCK_TOKEN.match(e)]
            elements = [e for e in entries if not BLOCK_TOKEN.match(e)]
            return {"include_exclude": mode.lower(), "include_exclude_blocks": " ".join(blocks),
                    "include_exclude_elements": ",".join(elements)}
    return {}


# sd-mecha -------------------------------------------------------------------------------

MECHA_METHODS = {"weighted_sum": "weight_sum", "slerp": "slerp", "add_difference": "add_difference"}


def from_mecha(text: str) -> Mapped:
    """sd-mecha's ``mecha_recipe`` (.mecha text) as our recipe, where its methods map onto ours."""
    mapped = Mapped("sd-mecha", "sd-mecha recipe")
    try:
        nodes = _mecha_nodes(text)
        mapped.summary = _mecha_summary(nodes, len(nodes) - 1)
        mapped.recipe = _mecha_recipe(nodes, len(nodes) - 1, mapped)
    except (ValueError, IndexError, RecipeError) as error:
        mapped.cannot_map.append(f"cannot read it: {error}")
        mapped.recipe = None
    if isinstance(mapped.recipe, str):  # the whole recipe is one model: nothing to merge
        mapped.cannot_map.append("it names a single model, no merge")
        mapped.recipe = None
    return mapped


def _mecha_nodes(text: str) -> list[tuple[str, list, dict]]:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines or not lines[0].startswith("version"):
        raise ValueError("no version line")
    nodes = []
    for line in lines[1:]:
        command, *tokens = shlex.split(line)
        positional = [t for t in tokens if "=" not in t or t.startswith("&")]
        named = dict(t.split("=", 1) for t in tokens if "=" in t and not t.startswith("&"))
        nodes.append((command, positional, named))
    return nodes


def _mecha_recipe(nodes: list, index: int, mapped: Mapped):
    """Node ``index`` as a model name (str), a Recipe, or None (not mapped; reasons appended)."""
    command, args, named = nodes[index]
    if command == "model":
        name = Path(args[0]).name
        mapped.models.setdefault(f"node {index}", {"name": name})
        return name
    if command != "merge":
        mapped.cannot_map.append(f"a bare {command!r} used as a model")
        return None
    method, *inputs = args
    if method not in MECHA_METHODS:
        mapped.cannot_map.append(f"method {method!r} has no counterpart here")
        return None
    if method == "add_difference" and len(inputs) == 2:  # mecha's A + α·subtract(B, C)
        diff = nodes[_ref(inputs[1])]
        if diff[0] != "merge" or diff[1][0] != "subtract":
            mapped.cannot_map.append("add_difference of something other than a subtract")
            return None
        inputs = [inputs[0], *diff[1][1:]]
    slots = [_mecha_recipe(nodes, _ref(ref), mapped) for ref in inputs]
    alpha = _mecha_number(named.get("alpha", "0.5"), nodes, mapped)
    if None in slots or alpha is None:
        return None
    return Recipe(model_a=slots[0], model_b=slots[1], model_c=slots[2] if len(slots) > 2 else None,
                  mode=MECHA_METHODS[method], alpha=alpha)


def _mecha_number(value: str, nodes: list, mapped: Mapped) -> Optional[float]:
    if value.startswith("&"):
        kind = nodes[_ref(value)][0]
        mapped.cannot_map.append(f"alpha given as a {kind} (per-key or per-block values in sd-mecha's naming)")
        return None
    return float(value)


def _mecha_summary(nodes: list, index: int) -> str:
    command, args, named = nodes[index]
    if command == "model":
        return Path(args[0]).name
    if command != "merge":
        return command
    inner = ", ".join(_mecha_summary(nodes, _ref(a)) if a.startswith("&") else a for a in args[1:])
    extra = "".join(f", {k}={v}" for k, v in named.items())
    return f"{args[0]}({inner}{extra})"


def _ref(token: str) -> int:
    if not token.startswith("&"):
        raise ValueError(f"expected a reference &N, got {token!r}")
    return int(token[1:])


# The parent tree (A1111's sd_merge_models) ------------------------------------------------

def parent_tree(metadata: dict[str, str]) -> list[dict]:
    """The inputs of the merge stored in ``metadata`` and, recursively, their inputs.

    Example:
        >>> parent_tree(ckpt.metadata)[0]
        {'name': 'a', 'sha256': '…', 'recipe': 'Weighted sum of x and y, multiplier 0.5', 'parents': [...]}
    """
    models = _models(metadata)
    raw = _json(metadata.get(A1111_RECIPE_KEY))
    return [_node(sha, models, 0) for sha in _input_hashes(raw)] if models else []


def _node(sha: str, models: dict, depth: int) -> dict:
    entry = models.get(sha) if isinstance(models.get(sha), dict) else {}
    node = {"name": entry.get("name"), "sha256": sha}
    raw = _json(entry.get("sd_merge_recipe"))
    if isinstance(raw, dict) and depth < MAX_TREE_DEPTH:
        mapped = from_original(raw, models) if raw.get("type") == ORIGINAL_TYPE else from_a1111(raw, models)
        node["recipe"] = mapped.summary
        node["parents"] = [_node(parent, models, depth + 1) for parent in _input_hashes(raw)]
    return node


def _input_hashes(raw) -> list[str]:
    if not isinstance(raw, dict):
        return []
    keys = ("model_a", "model_b", "model_c") if raw.get("type") == ORIGINAL_TYPE else [k for k, _ in A1111_ROLES]
    return [raw[k] for k in keys if isinstance(raw.get(k), str) and raw[k]]


# helpers ----------------------------------------------------------------------------------

def _recipe(mapped: Mapped, **options) -> Optional[Recipe]:
    slots = {role: entry["name"] for role, entry in mapped.models.items()}
    try:
        return Recipe(**slots, **{k: v for k, v in options.items() if v is not None})
    except MergeError as error:
        mapped.cannot_map.append(str(error))
        return None


def _models(metadata: dict[str, str]) -> dict:
    models = _json(metadata.get(A1111_MODELS_KEY))
    return models if isinstance(models, dict) else {}


def _name_of(sha: str, models: dict) -> str:
    entry = models.get(sha)
    name = entry.get("name") if isinstance(entry, dict) else None
    return name or sha[:10]


def _names(raw: dict, models: dict) -> str:
    hashes = _input_hashes(raw)
    return " and ".join(_name_of(sha, models) for sha in hashes) or "no recorded models"


def _joined(value) -> Optional[str]:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or None
    return str(value) if value not in (None, "") else None


def _json(text):
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None


def _type_of(raw) -> str:
    return raw.get("type", "") if isinstance(raw, dict) else type(raw).__name__


def _text(raw) -> str:
    return _type_of(raw) or "?"
