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
- sd-mecha 1.x: ``mecha_recipe``, its ``.mecha`` graph (see the sd-mecha section below).
  ``weighted_sum``, ``slerp``, ``add_difference`` of a ``subtract`` (under its ``fallback``),
  of a ``perpendicular_component`` (add_perpendicular), of a ``ties_sum`` or ``model_stock`` of
  task vectors, and ``geometric_median`` map onto our methods, ratios given as numbers or per
  block (its supermerger block configs); nested merges map onto chained recipes. Anything
  else is named, with why, in ``cannot_map``.

A replay computes as the source tool did: A1111's and sd-mecha's recipes map onto calcmodes
"A1111" and "sd-mecha" (mergers/methods/foreign.py), and each mapping says which arithmetic it
uses and which of the tool's settings its format does not record (``not_recorded``).

Example:
    >>> info = describe_stored_recipes(open_checkpoint("merged.safetensors").metadata)
    >>> info["a1111"]["summary"]
    'Weighted sum of A and B, multiplier 0.3'
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mergers.chain import describe
from mergers.errors import MergeError, RecipeError
from mergers.metadata import A1111_MODELS_KEY, A1111_RECIPE_KEY, stored_recipe
from mergers.methods.foreign import MECHA_COS_EPS, MECHA_MEDIAN
from mergers.recipe import Recipe
from mergers.writer import OUTPUT_DTYPES

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
# How a replay of each format computes (the calcmode it runs with says the same).
ARITHMETIC = {
    "supermerger": "ours, as recorded (bit for bit)",
    "sd-webui-supermerger": "ours, which computes as the original SuperMerger does",
    "a1111": "A1111's: (1 − α)·A + α·B and A + α·(B − C) in the inputs' dtype (calcmode A1111)",
    "sd-mecha": "sd-mecha's: its formulas in fp32, written in the file's dtype (calcmode sd-mecha); "
                "SDXL's conditioner.embedders.1.model.positional_embedding stays model A's, as in the "
                "original SuperMerger, where sd-mecha merges it",
}
# Settings a format does not record: a replay cannot know whether they were used.
ORIGINAL_NOT_RECORDED = (
    "Adjust (detail, contrast, brightness, colour)",
    "bake-in VAE",
    "gamma (the option of calcmode extract)",
    "save options: precision (fp16/fp32/bf16: read from this file's tensors), prune, reset CLIP ids",
    "use extended XL (SDXL elemental block names)",
    "seed (calcmode plus random)",
)
A1111_NOT_RECORDED = (
    "the baked-in VAE's hash (bake_in_vae names a file: the replay uses whichever file has that name)",
    "the metadata options (copy metadata fields, custom metadata JSON; no effect on the weights)",
)


@dataclass
class Mapped:
    """One stored recipe as we read it: a Recipe where it maps, and what does not."""

    tool: str
    summary: str
    recipe: Optional[Recipe] = None
    models: dict = field(default_factory=dict)  # role → {"name", "sha256"}, to find the inputs
    cannot_map: list[str] = field(default_factory=list)
    arithmetic: str = ""  # how a replay computes, in words
    not_recorded: list[str] = field(default_factory=list)  # settings the format does not keep

    def as_dict(self) -> dict:
        return {"tool": self.tool, "summary": self.summary,
                "recipe": self.recipe.to_dict() if self.recipe else None,
                "runnable": self.recipe is not None and not self.cannot_map, "cannot_map": self.cannot_map,
                "arithmetic": self.arithmetic, "not_recorded": self.not_recorded}


def describe_stored_recipes(metadata: dict[str, str], *, file_dtype: Optional[str] = None) -> dict:
    """Every merge recipe stored in a file's metadata, mapped onto ours where possible.

    Keys: ``supermerger``, ``sd-webui-supermerger`` (the original), ``a1111``, ``sd-mecha``
    (those present), each with a summary, our recipe (or None), whether it can be re-run and
    what cannot be mapped, which arithmetic a replay uses and which settings the format does not
    record; ``parents`` is A1111's ``sd_merge_models`` tree. ``file_dtype`` ("fp16", …: see
    ``file_dtype_of``) stands in for the output precision the foreign formats do not record.

    Example:
        >>> describe_stored_recipes({"sd_merge_recipe": '{"type": "webui", "interp_method": "Add difference", ...}'})
        {'a1111': {'tool': 'AUTOMATIC1111 checkpoint merger', ...}, 'parents': [...]}
    """
    found = {mapped_key(m): m.as_dict() for m in stored_recipes(metadata, file_dtype=file_dtype)}
    parents = parent_tree(metadata)
    if parents:
        found["parents"] = parents
    return found


def stored_recipes(metadata: dict[str, str], *, file_dtype: Optional[str] = None) -> list[Mapped]:
    """The recipes in ``metadata``, best first: ours, the original's, A1111's, sd-mecha's."""
    found = []
    try:
        ours = stored_recipe(metadata)
    except RecipeError as error:
        found.append(Mapped("supermerger", "supermerger recipe", cannot_map=[str(error).lstrip(": ")]))
        ours = None
    if ours is not None:
        found.append(Mapped("supermerger", f"supermerger recipe: {describe(ours[0])}", ours[0], ours[1],
                            arithmetic=ARITHMETIC["supermerger"]))
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
    return [_with_file_dtype(mapped, file_dtype) for mapped in found]


def _with_file_dtype(mapped: Mapped, file_dtype: Optional[str]) -> Mapped:
    """The original and sd-mecha do not record the output precision: the file's own tensors tell it."""
    if mapped.recipe is not None and file_dtype and mapped.tool in ("SuperMerger (original)", "sd-mecha"):
        mapped.recipe = mapped.recipe.with_changes(dtype=file_dtype)
    return mapped


def file_dtype_of(dtypes) -> Optional[str]:
    """The output-dtype name ("fp16", …) of the most common floating dtype among ``dtypes``, or None.

    Example:
        >>> file_dtype_of([torch.float16, torch.float16, torch.int64])
        'fp16'
    """
    names = {dtype: name for name, dtype in OUTPUT_DTYPES.items()}
    counts = Counter(names[d] for d in dtypes if d in names)
    return counts.most_common(1)[0][0] if counts else None


def mapped_key(mapped: Mapped) -> str:
    return {"AUTOMATIC1111 checkpoint merger": "a1111", "SuperMerger (original)": "sd-webui-supermerger",
            "sd-mecha": "sd-mecha"}.get(mapped.tool, mapped.tool)


def rerunnable_recipe(metadata: dict[str, str], *, source: str = "") -> tuple[Recipe, dict]:
    """The best stored recipe that maps fully onto ours, with its inputs' names and hashes.

    Example:
        >>> recipe, known = rerunnable_recipe(ckpt.metadata, source=ckpt.name)
        >>> merge_to_file(recipe, "again.safetensors", resolve=lambda n: find_model(n, folder, known))
    """
    mapped = rerunnable(metadata, source=source)
    return mapped.recipe, mapped.models


def rerunnable(metadata: dict[str, str], *, source: str = "", file_dtype: Optional[str] = None) -> Mapped:
    """The best stored recipe that maps fully onto ours (its ``recipe`` set), or MergeError saying why none.

    Example:
        >>> mapped = rerunnable(ckpt.metadata, source=ckpt.name, file_dtype="fp16")
        >>> mapped.not_recorded  # settings the replay cannot know
    """
    recipes = stored_recipes(metadata, file_dtype=file_dtype)
    for mapped in recipes:
        if mapped.recipe is not None and not mapped.cannot_map:
            return mapped
    reasons = "; ".join(f"{m.tool}: {', '.join(m.cannot_map)}" for m in recipes if m.cannot_map)
    raise MergeError(f"{source}: no merge recipe that supermerger can re-run"
                     + (f" ({reasons})" if reasons else " (the file stores none)"))


# A1111 ---------------------------------------------------------------------------------

def from_a1111(raw: dict, models: dict) -> Mapped:
    """A1111's ``sd_merge_recipe`` (type "webui") as our recipe, where it maps."""
    method = raw.get("interp_method")
    mapped = Mapped("AUTOMATIC1111 checkpoint merger", f"{method} of "
                    f"{_names(raw, models)}, multiplier {raw.get('multiplier')}",
                    arithmetic=ARITHMETIC["a1111"], not_recorded=list(A1111_NOT_RECORDED))
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
    mapped.recipe = _recipe(mapped, mode=A1111_METHODS[method], calcmode="A1111", alpha=raw.get("multiplier", 0.5),
                            dtype="fp16" if raw.get("save_as_half") else None,
                            bake_vae=bake if bake and bake != "None" else None)
    return mapped


# The original SuperMerger ---------------------------------------------------------------

def from_original(raw: dict, models: dict) -> Mapped:
    """The original SuperMerger's ``sd_merge_recipe`` as our recipe, where it maps."""
    mode = str(raw.get("mode") or "").split(":")[0].strip()
    mapped = Mapped("SuperMerger (original)", f"{mode} ({raw.get('calcmode') or 'normal'}) of {_names(raw, models)}",
                    arithmetic=ARITHMETIC["sd-webui-supermerger"], not_recorded=list(ORIGINAL_NOT_RECORDED))
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
#
# sd-mecha 1.x writes its recipe graph as .mecha text: ``version 0.1.0``, then one instruction a line,
# ``&N`` citing line N: ``model "path" model_config=… merge_space=…``, ``dict key=0.3``,
# ``literal &N model_config="singleton-mecha"`` and ``merge "method" &… name=&…``. A scalar ratio is
# ``convert_singleton(literal(dict key=V))``; per-block ratios are ``convert_sd1_blocks_to_ldm`` (or
# ``…sdxl…sgm``) of a literal in ``sd1-supermerger_blocks`` (``sdxl-…``), the original's 26 (20) blocks;
# ``add_difference(a, b, c)`` is ``fallback(add_difference(a, subtract(b, c), α), a)``.

MECHA_VERSION = "version 0.1.0"
MECHA_TOKEN = re.compile(r'(?:(\w+)=)?("(?:\\.|[^"\\])*"|[^\s"]+)')
MECHA_CONSTANTS = {"null": None, "true": True, "false": False}
SD1_BLOCKS = ("BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12)))
SDXL_BLOCKS = ("BASE", *(f"IN{i:02}" for i in range(9)), "M00", *(f"OUT{i:02}" for i in range(9)))
# block conversion → (sd-mecha's block config, our block order); SDXL's extra VAE block must equal BASE.
MECHA_BLOCKS = {"convert_sd1_blocks_to_ldm": ("sd1-supermerger_blocks", SD1_BLOCKS),
                "convert_sdxl_blocks_to_sgm": ("sdxl-supermerger_blocks", SDXL_BLOCKS)}
# U-Net keys that sd-mecha's block conversions give BASE's value (ours: IN00's).
MECHA_BASE_ELEMENTS = ("time_embed", "label_emb")
# Settings sd-mecha's merge() takes that the recipe does not record.
MECHA_NOT_RECORDED = (
    "merge_dtype (sd-mecha's default fp32 is assumed)",
    "output_dtype (read from this file's tensors)",
    "omit_non_finite_inputs (on by default: an input key holding NaN/Inf is left out)",
    "fallback_model (a model for the keys the recipe cannot produce)",
    "merge_device",
)


@dataclass(frozen=True, eq=False)  # eq=False: sd-mecha writes an instruction once, so identity is equality
class MechaNode:
    """One .mecha instruction, its references resolved."""

    command: str  # model | dict | literal | merge
    args: tuple
    named: dict

    def arg(self, index: int, name: str, default=None):
        """A merge's parameter by position (after the method) or name."""
        if name in self.named:
            return self.named[name]
        return self.args[index + 1] if len(self.args) > index + 1 else default

    @property
    def method(self) -> str:
        return self.args[0] if self.command == "merge" else self.command


def from_mecha(text: str) -> Mapped:
    """sd-mecha's ``mecha_recipe`` (.mecha text) as our recipe, computed as sd-mecha computes."""
    mapped = Mapped("sd-mecha", "sd-mecha recipe", arithmetic=ARITHMETIC["sd-mecha"],
                    not_recorded=list(MECHA_NOT_RECORDED))
    try:
        root = parse_mecha(text)
    except (ValueError, IndexError) as error:
        mapped.cannot_map.append(f"cannot read it: {error}")
        return mapped
    mapped.summary = _mecha_text(root)
    recipe = _mecha_slot(root, mapped)
    if isinstance(recipe, str):
        mapped.cannot_map.append("it names a single model, no merge")
    elif recipe is not None and not mapped.cannot_map:
        mapped.recipe = recipe.with_changes(dtype="fp16")  # sd_mecha.merge's default output dtype
    return mapped


def parse_mecha(text: str) -> MechaNode:
    """The last instruction of .mecha ``text`` (the recipe's root), references resolved."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines or not lines[0].startswith("version"):
        raise ValueError("no version line")
    if lines[0] != MECHA_VERSION:
        raise ValueError(f"{lines[0]!r}: only sd-mecha's {MECHA_VERSION!r} is read")
    nodes: list[MechaNode] = []
    for number, line in enumerate(lines[1:], start=1):
        command, *tokens = MECHA_TOKEN.findall(line)
        if command[0] or command[1] not in ("model", "dict", "literal", "merge"):
            raise ValueError(f"line {number}: unknown instruction {line[:40]!r}")
        args = tuple(_mecha_value(value, nodes) for name, value in tokens if not name)
        named = {name: _mecha_value(value, nodes) for name, value in tokens if name}
        nodes.append(MechaNode(command[1], args, named))
    if not nodes:
        raise ValueError("no instructions")
    return nodes[-1]


def _mecha_value(token: str, nodes: list):
    if token in MECHA_CONSTANTS:
        return MECHA_CONSTANTS[token]
    if token.startswith("&"):
        index = int(token[1:])
        if not 0 <= index < len(nodes):
            raise ValueError(f"reference {token} out of bounds")
        return nodes[index]
    if token.startswith('"'):
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return float(token) if "." in token or "e" in token.lower() else int(token)


def _mecha_slot(node, mapped: Mapped):
    """A model slot: a model's file name, a Recipe, or None (not mapped; the reason appended)."""
    if not isinstance(node, MechaNode) or node.command != "model":
        if isinstance(node, MechaNode) and node.command == "merge":
            return _mecha_merge(node, mapped)
        mapped.cannot_map.append(f"a {_mecha_text(node)} used as a model")
        return None
    name = Path(str(node.args[0])).name
    mapped.models.setdefault(name, {"name": name})
    return name


def _mecha_merge(node: MechaNode, mapped: Mapped):
    handler = MECHA_METHODS.get(node.method)
    if handler is None:
        mapped.cannot_map.append(f"method {node.method!r} has no counterpart here")
        return None
    return handler(node, mapped)


def _mecha_ratio(value, mapped: Mapped, name: str) -> dict:
    """A ratio as recipe fields: ``{"alpha": x}`` or ``{"weights_alpha": "26 values"}``; {} if not mapped."""
    scalar = _mecha_scalar(value)
    if isinstance(scalar, (int, float)) and not isinstance(scalar, bool):
        return {name: float(scalar)}
    if isinstance(value, MechaNode) and value.method in MECHA_BLOCKS and name == "alpha":
        config, order = MECHA_BLOCKS[value.method]
        blocks = _literal_values(value.arg(0, "blocks"), config)
        missing = [block for block in order if not isinstance(blocks.get(block), (int, float))]
        if not missing and blocks.get("VAE", blocks["BASE"]) == blocks["BASE"]:
            fields = {"weights_alpha": ",".join(str(blocks[block]) for block in order)}
            if blocks["BASE"] != blocks["IN00"]:  # sd-mecha gives the U-Net's time (and label) embedding
                # BASE's value; ours, like the original, IN00's: an elemental rule says so
                fields["elemental"] = f"IN00:{' '.join(MECHA_BASE_ELEMENTS)}:{blocks['BASE']}"
            return fields
        reason = f"blocks {', '.join(missing)} missing" if missing else "a VAE value other than BASE's"
        mapped.cannot_map.append(f"{name} per block in {config} with {reason}")
        return {}
    mapped.cannot_map.append(f"{name} given as {_mecha_text(value)} (only a number, or one value per block, maps)")
    return {}


def _literal_values(node, config: str) -> dict:
    """The values of ``literal(dict …)`` in ``config``, or {}."""
    if not (isinstance(node, MechaNode) and node.command == "literal" and node.args):
        return {}
    if node.named.get("model_config") not in (config, None) or not isinstance(node.args[0], MechaNode):
        return {}
    return dict(node.args[0].named) if node.args[0].command == "dict" else {}


def _mecha_recipe(mapped: Mapped, mode: str, models: list, **fields) -> Optional[Recipe]:
    slots = [_mecha_slot(m, mapped) for m in models]
    if None in slots or mapped.cannot_map:
        return None
    a, b, *rest = slots
    c, more = (rest[0], tuple(rest[1:])) if rest else (None, ())
    try:  # nested merges stay fp32 between steps, as in sd-mecha
        return Recipe(model_a=a, model_b=b, model_c=c, more_models=more, mode=mode, calcmode="sd-mecha",
                      dtype="fp32", **fields)
    except MergeError as error:
        mapped.cannot_map.append(str(error))
        return None


def _mecha_two(mode: str):
    def read(node: MechaNode, mapped: Mapped):
        ratio = _mecha_ratio(node.arg(2, "alpha", 0.5), mapped, "alpha")
        return _mecha_recipe(mapped, mode, [node.arg(0, "a"), node.arg(1, "b")], **ratio)
    return read


def _mecha_fallback(node: MechaNode, mapped: Mapped):
    """``fallback(x, a)``: x, and a for the keys x cannot produce; add_difference's own wrapper
    falls back to its model A, which is what our merges do for such keys too."""
    merged, fallback = node.arg(0, "a"), node.arg(1, "default")
    if _mecha_first_model(merged) is not fallback:
        mapped.cannot_map.append(f"fallback to {_mecha_text(fallback)}, not the merge's model A")
        return None
    return _mecha_slot(merged, mapped)


def _mecha_first_model(node):
    while isinstance(node, MechaNode) and node.command == "merge":
        node = node.arg(0, "a")
    return node


def _mecha_add_difference(node: MechaNode, mapped: Mapped):
    """``add_difference(a, delta, α)``: which of our methods depends on how the delta was made."""
    a, delta = node.arg(0, "a"), node.arg(1, "b")
    ratio = _mecha_ratio(node.arg(2, "alpha", 1.0), mapped, "alpha")
    kind = delta.method if isinstance(delta, MechaNode) else None
    if kind == "subtract":
        return _mecha_recipe(mapped, "add_difference", [a, delta.arg(0, "a"), delta.arg(1, "b")], **ratio)
    if kind == "perpendicular_component":
        base, change = delta.arg(0, "a"), delta.arg(1, "b")
        if _is_subtract(base, a) and _is_subtract(change) and change.arg(1, "b") is base.arg(1, "b"):
            return _mecha_recipe(mapped, "add_perpendicular", [a, change.arg(0, "a"), base.arg(1, "b")], **ratio)
    if kind in ("ties_sum", "model_stock"):
        tuned = [d.arg(0, "a") for d in delta.args[1:] if _is_subtract(d) and d.arg(1, "b") is a]
        if len(tuned) == len(delta.args) - 1 >= 2:
            return _mecha_task(kind, delta, mapped, [a, *tuned], ratio)
    mapped.cannot_map.append(f"add_difference of {_mecha_text(delta)}: no method of ours adds that delta")
    return None


def _is_subtract(node, first=None) -> bool:
    return (isinstance(node, MechaNode) and node.method == "subtract"
            and (first is None or node.arg(0, "a") is first))


def _mecha_task(kind: str, delta: MechaNode, mapped: Mapped, models: list, ratio: dict):
    if kind == "model_stock":
        _require(delta, mapped, cos_eps=MECHA_COS_EPS)
        return _mecha_recipe(mapped, "model_stock", models, **ratio)
    _require(delta, mapped, vote_sgn=False)  # our sd-mecha TIES elects signs by count, vote_sgn's default
    density = _mecha_ratio(delta.named.get("k", 1.0), mapped, "beta")  # ties_sum's k: the fraction kept
    return _mecha_recipe(mapped, "ties", models, **ratio, **density)


def _mecha_geometric_median(node: MechaNode, mapped: Mapped):
    models = list(node.args[1:])
    _require(node, mapped, **MECHA_MEDIAN)
    if len(models) < 3:
        mapped.cannot_map.append("geometric_median of fewer than 3 models (ours takes A, B and C)")
        return None
    return _mecha_recipe(mapped, "geometric_median", models, alpha=1.0)


def _require(node: MechaNode, mapped: Mapped, **defaults) -> None:
    """Refuse a setting other than the default our sd-mecha method computes with."""
    for name, default in defaults.items():
        value = _mecha_scalar(node.named.get(name, default))
        if value != default or type(value) is not type(default):
            mapped.cannot_map.append(f"{node.method} with {name}={value!r} (only sd-mecha's default {default!r} maps)")


def _mecha_scalar(value):
    """``convert_singleton(literal(dict key=V))`` → V; anything else as it is."""
    if isinstance(value, MechaNode) and value.method == "convert_singleton":
        return _literal_values(value.arg(0, "a"), "singleton-mecha").get("key")
    return value


def _mecha_subtract(node: MechaNode, mapped: Mapped) -> None:
    mapped.cannot_map.append("a bare subtract: a difference of models, not a model")


MECHA_METHODS = {
    "weighted_sum": _mecha_two("weight_sum"),
    "slerp": _mecha_two("slerp"),
    "add_difference": _mecha_add_difference,
    "fallback": _mecha_fallback,
    "geometric_median": _mecha_geometric_median,
    "subtract": _mecha_subtract,
}


def _mecha_text(node) -> str:
    """A node as readable text: ``weighted_sum(a.safetensors, b.safetensors, 0.3)``."""
    if not isinstance(node, MechaNode):
        return repr(node) if isinstance(node, str) else str(node)
    if node.command == "model":
        return Path(str(node.args[0])).name
    if node.command == "dict":
        return "{" + ", ".join(f"{k}: {v}" for k, v in node.named.items()) + "}"
    if node.command == "literal":
        return _mecha_text(node.args[0]) if node.args else "literal"
    if node.method == "convert_singleton":
        return _mecha_text(node.arg(0, "a")).removeprefix("{key: ").removesuffix("}")
    inner = [_mecha_text(a) for a in node.args[1:]] + [f"{k}={_mecha_text(v)}" for k, v in node.named.items()]
    return f"{node.method}({', '.join(inner)})"


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
