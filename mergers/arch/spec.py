"""Layouts and architectures as data: the JSON a layout file holds, read into frozen values and checked.

A layout file (``mergers/arch/data/layouts/*.json``, or one of yours in :func:`~mergers.arch.registry.user_layouts_dir`)
holds ``"layouts"`` (block ids and the key rules that assign them) and ``"architectures"`` (a name, a label, the
layout and the key patterns that recognise it). docs/architectures.md describes every field. Every mistake is
reported with the file, the entry and the field, before any model is read.

Example:
    >>> layout = parse_layout({"name": "tiny", "blocks": ["IN", "B00-B01", "OUT"],
    ...                        "rules": [{"match": "blocks\\\\.(?P<n>\\\\d+)\\\\.", "block": "B{n:02d}"}]}, "tiny.json")
    >>> layout.blocks, layout.block_of("blocks.1.attn.weight")
    (('IN', 'B00', 'B01', 'OUT'), 'B01')
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergers.errors import ArchitectureError

PREDICTIONS = ("eps", "v", "unknown")
LAYOUT_FIELDS = ("name", "label", "about", "blocks", "rules", "default", "name_needs_model", "name_needs_weight",
                 "fine_blocks", "prune_keep")
RULE_FIELDS = ("match", "block", "fine", "why")
ARCH_FIELDS = ("name", "label", "about", "layout", "prediction", "detect", "lora")
DETECT_FIELDS = ("priority", "all", "none", "shape", "max_index", "why")
SHAPE_FIELDS = ("key", "dim", "equals", "ndim")
MAX_INDEX_FIELDS = ("match", "at_least", "at_most")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RANGE = re.compile(r"([A-Z_]*?)(\d+)-([A-Z_]*?)(\d+)")
_BLOCK_ID = re.compile(r"[A-Z][A-Z0-9_]*")
DEFAULT_PRIORITY = 80  # below the shipped key rules (89-120), above the U-Net shape fallbacks (30-50)


class LayoutFileError(ArchitectureError):
    """A layout file is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class BlockRule:
    """Keys that ``pattern`` finds get ``block`` (a template over its named groups; None: never merged)."""

    pattern: re.Pattern[str]
    block: str | None
    fine: str | None = None

    def apply(self, key: str) -> tuple[str | None, str | None] | None:
        """(block, fine block) for ``key``, or None when the pattern does not match."""
        match = self.pattern.search(key)
        if match is None:
            return None
        values = {name: _group_value(text) for name, text in match.groupdict().items()}
        return _fill(self.block, values), _fill(self.fine, values)


@dataclass(frozen=True)
class Layout:
    """Ordered block ids and the rules that give each key its block."""

    name: str
    label: str
    blocks: tuple[str, ...]
    rules: tuple[BlockRule, ...]
    default: str | None = None  # the block of a key no rule matches (SD1: BASE)
    name_needs_model: bool = False  # the original merges only keys holding "model" for SD1/SDXL
    name_needs_weight: bool = False  # and only "weight"/"bias" keys for SD1/SDXL/Flux (not Flux's norm "scale")
    fine_blocks: tuple[str, ...] = ()
    prune_keep: tuple[str, ...] = ()  # prune keeps keys holding one of these; empty: keep every key
    source: str = ""

    def block_of(self, key: str) -> str | None:
        """The block whose ratio ``key`` gets; None for "not merged" or a block number the layout lacks."""
        block = self._blocks_of(key)[0]
        return block if block in self.blocks else None

    def fine_block_of(self, key: str) -> str | None:
        """The fine block name (SDXL's 110), or None when the key has none or its block is not merged."""
        block, fine = self._blocks_of(key)
        return fine if block in self.blocks and fine in self.fine_blocks else None

    def _blocks_of(self, key: str) -> tuple[str | None, str | None]:
        for rule in self.rules:
            found = rule.apply(key)
            if found is not None:
                return found
        return self.default, None

    @property
    def groups(self) -> tuple[str, ...]:
        """Readable-form group selectors: the letters of numbered ids (IN, OUT, D, S…), in layout order."""
        letters = [match[1] for block in self.blocks if (match := re.fullmatch(r"([A-Z_]+?)\d+", block))]
        return tuple(dict.fromkeys(["IN", "OUT", *letters]))

    @property
    def shape_text(self) -> str:
        """The ids in short, e.g. "CLIP, T5, IN, D00…D18, S00…S37, OUT"."""
        return ", ".join(_compress(self.blocks))


@dataclass(frozen=True)
class ShapeTest:
    """Every key ``key`` finds (at least one) has ``equals`` at ``dim`` and/or ``ndim`` dimensions."""

    key: re.Pattern[str]
    dim: int | None = None
    equals: int | None = None
    ndim: int | None = None

    def holds(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        found = [tuple(shape) for name, shape in shapes.items() if self.key.search(name)]
        if self.dim is not None:  # like the U-Net width test, shapes too short to have the dimension are ignored
            found = [shape for shape in found if len(shape) > self.dim]
        return bool(found) and all(self._fits(shape) for shape in found)

    def _fits(self, shape: tuple[int, ...]) -> bool:
        if self.ndim is not None and len(shape) != self.ndim:
            return False
        return self.equals is None or self.dim is None or shape[self.dim] == self.equals


@dataclass(frozen=True)
class DetectRule:
    """One way to recognise an architecture: every test here must hold."""

    priority: int
    all: tuple[re.Pattern[str], ...] = ()
    none: tuple[re.Pattern[str], ...] = ()
    shape: tuple[ShapeTest, ...] = ()
    max_index: tuple[re.Pattern[str], int | None, int | None] | None = None  # (pattern, at least, at most)

    def matches(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        keys = list(shapes)
        if not all(any(p.search(k) for k in keys) for p in self.all):
            return False
        if any(p.search(k) for p in self.none for k in keys):
            return False
        if not all(test.holds(shapes) for test in self.shape):
            return False
        return self.max_index is None or _max_index_fits(keys, *self.max_index)


@dataclass(frozen=True)
class ArchSpec:
    """A recognised model family: its name, label, layout and the rules that detect it."""

    name: str
    label: str
    layout: str
    prediction: str = "unknown"
    detect: tuple[DetectRule, ...] = ()
    lora: bool = False  # whether the LoRA tools know its module names (SD1/SD2/SDXL/SD3/Flux)
    source: str = ""


def parse_layout(entry: object, where: str, *, source: str = "") -> Layout:
    """A :class:`Layout` from one ``"layouts"`` entry; ``where`` (file and entry) is named in errors.

    Example:
        >>> parse_layout({"name": "two", "blocks": ["IN", "OUT"], "default": "IN"}, "two.json").block_of("x.weight")
        'IN'
    """
    data = _fields(entry, LAYOUT_FIELDS, ("name", "blocks"), where)
    name = _name(data["name"], where)
    where = f"{where}: layout {name!r}"
    blocks = expand_blocks(_string_list(data["blocks"], "blocks", where), where)
    rules = tuple(_parse_rule(rule, f"{where}: rules[{n}]")
                  for n, rule in enumerate(_list(data.get("rules", []), "rules", where)))
    default = data.get("default")
    if default is not None and default not in blocks:
        raise LayoutFileError(f"{where}: default {default!r} is not one of its blocks ({', '.join(_compress(blocks))})")
    return Layout(name, str(data.get("label") or name), blocks, rules, default,
                  bool(data.get("name_needs_model", False)), bool(data.get("name_needs_weight", False)),
                  tuple(_string_list(data.get("fine_blocks", []), "fine_blocks", where)),
                  tuple(_string_list(data.get("prune_keep", []), "prune_keep", where)), source)


def parse_architecture(entry: object, where: str, *, default_priority: int = DEFAULT_PRIORITY,
                       source: str = "") -> ArchSpec:
    """An :class:`ArchSpec` from one ``"architectures"`` entry; its layout is checked by the registry.

    Example:
        >>> parse_architecture({"name": "mine", "layout": "sd1", "detect": [{"all": ["^net\\."]}]}, "m.json").label
        'mine'
    """
    data = _fields(entry, ARCH_FIELDS, ("name", "layout", "detect"), where)
    name = _name(data["name"], where)
    where = f"{where}: architecture {name!r}"
    prediction = data.get("prediction", "unknown")
    if prediction not in PREDICTIONS:
        raise LayoutFileError(f"{where}: prediction {prediction!r} is not one of {', '.join(PREDICTIONS)}")
    rules = tuple(_parse_detect(rule, f"{where}: detect[{n}]", default_priority)
                  for n, rule in enumerate(_list(data["detect"], "detect", where)))
    if not rules:
        raise LayoutFileError(f"{where}: detect is empty; give at least one rule, e.g. {{\"all\": [\"double_blocks\"]}}")
    return ArchSpec(name, str(data.get("label") or name), _name(data["layout"], f"{where}: layout"), prediction,
                    rules, bool(data.get("lora", False)), source)


def expand_blocks(items: Sequence[str], where: str) -> tuple[str, ...]:
    """Block ids with ranges written out: ``["IN", "D00-D02"]`` → ``("IN", "D00", "D01", "D02")``.

    Example:
        >>> expand_blocks(["BASE", "IN00-IN02", "D100-D101"], "x.json")
        ('BASE', 'IN00', 'IN01', 'IN02', 'D100', 'D101')
    """
    blocks: list[str] = []
    for item in items:
        blocks += _expand_one(item, where)
    duplicates = sorted({block for block in blocks if blocks.count(block) > 1})
    if duplicates:
        raise LayoutFileError(f"{where}: blocks {', '.join(duplicates)} are listed twice")
    if not blocks:
        raise LayoutFileError(f"{where}: blocks is empty")
    return tuple(blocks)


def _expand_one(item: str, where: str) -> list[str]:
    match = _RANGE.fullmatch(item)
    if match is None:
        if not _BLOCK_ID.fullmatch(item):
            raise LayoutFileError(f"{where}: block id {item!r} must be capital letters and digits, e.g. 'D00'")
        return [item]
    prefix, first, prefix_last, last = match.groups()
    if prefix != prefix_last or len(first) != len(last) or int(first) > int(last) or not prefix:
        raise LayoutFileError(f"{where}: block range {item!r} must be like 'D00-D18' (same letters and digit count, "
                              "first before last)")
    return [f"{prefix}{n:0{len(first)}d}" for n in range(int(first), int(last) + 1)]


def _parse_rule(entry: object, where: str) -> BlockRule:
    data = _fields(entry, RULE_FIELDS, ("match", "block"), where)
    pattern = _regex(data["match"], "match", where)
    block, fine = data["block"], data.get("fine")
    for field, template in (("block", block), ("fine", fine)):
        if template is not None:
            _check_template(template, pattern, field, where)
    return BlockRule(pattern, block, fine)


def _parse_detect(entry: object, where: str, default_priority: int) -> DetectRule:
    data = _fields(entry, DETECT_FIELDS, (), where)
    priority = data.get("priority", default_priority)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise LayoutFileError(f"{where}: priority {priority!r} must be a whole number (higher is tried first)")
    rule = DetectRule(
        priority,
        tuple(_regex(p, "all", where) for p in _string_list(data.get("all", []), "all", where)),
        tuple(_regex(p, "none", where) for p in _string_list(data.get("none", []), "none", where)),
        tuple(_parse_shape(test, f"{where}: shape[{n}]")
              for n, test in enumerate(_list(data.get("shape", []), "shape", where))),
        _parse_max_index(data["max_index"], f"{where}: max_index") if "max_index" in data else None,
    )
    if not (rule.all or rule.shape or rule.max_index):
        raise LayoutFileError(f"{where}: a detect rule needs 'all', 'shape' or 'max_index', or it would match any file")
    return rule


def _parse_shape(entry: object, where: str) -> ShapeTest:
    data = _fields(entry, SHAPE_FIELDS, ("key",), where)
    numbers = {field: data.get(field) for field in ("dim", "equals", "ndim")}
    for field, value in numbers.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise LayoutFileError(f"{where}: {field} {value!r} must be a whole number")
    if numbers["equals"] is not None and numbers["dim"] is None:
        raise LayoutFileError(f"{where}: 'equals' needs 'dim' (which dimension of the shape to compare)")
    return ShapeTest(_regex(data["key"], "key", where), **numbers)


def _parse_max_index(entry: object, where: str) -> tuple[re.Pattern[str], int | None, int | None]:
    data = _fields(entry, MAX_INDEX_FIELDS, ("match",), where)
    pattern = _regex(data["match"], "match", where)
    if pattern.groups < 1:
        raise LayoutFileError(f"{where}: match {pattern.pattern!r} needs a group capturing the number, e.g. (\\d+)")
    return pattern, data.get("at_least"), data.get("at_most")


def _max_index_fits(keys: list[str], pattern: re.Pattern[str], at_least: int | None, at_most: int | None) -> bool:
    numbers = [int(match.group(match.lastindex)) for key in keys
               if (match := pattern.search(key)) and match.lastindex and match.group(match.lastindex).isdigit()]
    if not numbers:
        return False
    return (at_least is None or max(numbers) >= at_least) and (at_most is None or max(numbers) <= at_most)


def _check_template(template: object, pattern: re.Pattern[str], field: str, where: str) -> None:
    if not isinstance(template, str):
        raise LayoutFileError(f"{where}: {field} {template!r} must be a block id, a template like 'D{{n:02d}}', or null")
    values = {name: 0 for name in pattern.groupindex}
    try:
        template.format(**values)
    except (KeyError, IndexError, ValueError) as error:
        raise LayoutFileError(f"{where}: {field} {template!r} does not fit match {pattern.pattern!r} "
                              f"(named groups: {', '.join(pattern.groupindex) or 'none'}): {error}") from error


def _fields(entry: object, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> dict:
    if not isinstance(entry, dict):
        raise LayoutFileError(f"{where}: expected an object {{…}}, got {type(entry).__name__}")
    for field in entry:
        if field not in allowed:
            close = difflib.get_close_matches(str(field), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(allowed)}"
            raise LayoutFileError(f"{where}: unknown field {field!r}{hint}")
    missing = [field for field in required if field not in entry]
    if missing:
        raise LayoutFileError(f"{where}: missing {', '.join(repr(m) for m in missing)}")
    return entry


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise LayoutFileError(f"{where}: name {value!r} must be lower-case letters, digits and _ (e.g. 'qwen_image')")
    return value


def _list(value: object, field: str, where: str) -> list:
    if not isinstance(value, list):
        raise LayoutFileError(f"{where}: {field} must be a list […], got {type(value).__name__}")
    return value


def _string_list(value: object, field: str, where: str) -> list[str]:
    items = _list(value, field, where)
    for item in items:
        if not isinstance(item, str):
            raise LayoutFileError(f"{where}: {field} must hold strings; {item!r} is not one")
    return items


def _regex(value: object, field: str, where: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise LayoutFileError(f"{where}: {field} {value!r} must be a regular expression string")
    try:
        return re.compile(value)
    except re.error as error:
        raise LayoutFileError(f"{where}: {field} {value!r} is not a valid regular expression: {error}") from error


def _group_value(text: str | None) -> int | str:
    """Digits become numbers (so ``{n:02d}`` pads them); a group that did not take part is empty."""
    if text is None:
        return ""
    return int(text) if text.isdigit() else text


def _fill(template: str | None, values: dict[str, int | str]) -> str | None:
    return None if template is None else template.format(**values)


def _compress(blocks: Sequence[str]) -> list[str]:
    """Runs of numbered ids with the same letters shortened to "D00…D18"."""
    parts: list[list[str]] = []
    for block in blocks:
        letters = re.sub(r"\d+$", "", block)
        if parts and letters != block and re.sub(r"\d+$", "", parts[-1][-1]) == letters and parts[-1][-1] != letters:
            parts[-1].append(block)
        else:
            parts.append([block])
    return [run[0] if len(run) == 1 else f"{run[0]}…{run[-1]}" for run in parts]
