"""Elemental merge: give chosen keys of chosen blocks their own ratio.

An elemental text is a list of ``Blocks:Elements:Ratio`` entries separated by
commas and/or newlines, as in the original SuperMerger (``elemental_en.md``)::

    OUT03 OUT04 OUT05:attn2 attn1.to_out:0.5
    NOT OUT04:attn:1
    OUT05:NOT attn proj:0.2

- **Blocks**: block ids separated by spaces; ``IN00-IN05`` is a range in layout
  order (either way round); a leading ``NOT`` means every block but these;
  empty means every block.
- **Elements**: substrings of the key, separated by spaces; a leading ``NOT``
  means keys holding none of them; empty means every key.
- **Ratio**: a number, or ``R``/``U``/``X`` (random; the caller draws it).

Later matching entries win, and the result replaces the key's block ratio.

Block names are the layout's ids (26 for SD1/SD2, 20 for SDXL) and are matched
against the key's own block. The original looks SDXL keys up in its SD1 table
(issue #468: from M00 on it names each SDXL block after the wrong one); here an
SDXL ``M00`` rule hits the middle block. With ``extended=True`` (SDXL only; the
original's "use extended XL") names are the 110 fine ids such as ``IN411``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mergers.arch.blocks import SDXL_FINE_BLOCKS
from mergers.arch.layouts import LAYOUTS
from mergers.errors import WeightsError
from mergers.weights import LAYOUT_LABELS, finite_float, format_number

NOT = "NOT"
RANDOM_RATIOS = frozenset({"R", "U", "X"})
BLOCK_ALIASES = {"MID": "M00"}


@dataclass(frozen=True)
class ElementalRule:
    """One ``Blocks:Elements:Ratio`` entry, ranges expanded.

    Example:
        >>> parse_elemental("IN01-IN02:attn:0.5", "sd1")[0].blocks
        ('IN01', 'IN02')
    """

    blocks: tuple[str, ...]  # block ids; empty = every block
    blocks_negated: bool  # leading NOT
    elements: tuple[str, ...]  # key substrings; empty = every key
    elements_negated: bool
    ratio: float | str  # a number, or "R" / "U" / "X" drawn per key by the caller
    fine_blocks: bool = False  # blocks are the 110 fine SDXL ids ("use extended XL")


def parse_elemental(text: str, layout: str, *, extended: bool = False) -> tuple[ElementalRule, ...]:
    """Read an elemental text for ``layout`` ("sd1" or "sdxl"); blank entries are skipped.

    Example:
        >>> parse_elemental("OUT05:NOT attn proj:0.2", "sd1")[0].elements
        ('attn', 'proj')
    """
    names = _block_names(layout, extended)
    return tuple(_parse_entry(entry, names, extended) for entry in _entries(text))


def elemental_ratio(
    rules: Sequence[ElementalRule],
    key: str,
    block: str,
    ratio: float,
    *,
    fine_block: str | None = None,
    draw: Callable[[str], float] | None = None,
) -> float:
    """The ratio of ``key`` (in ``block``, fine id ``fine_block``): the last matching rule's, else ``ratio``.

    ``draw(letter)`` gives the number for a random rule (R, U or X).

    Example:
        >>> elemental_ratio(parse_elemental("OUT05:attn2:0.2", "sd1"), "x.attn2.to_k.weight", "OUT05", 1.0)
        0.2
    """
    winner = None
    for rule in rules:
        if _rule_matches(rule, key, _name_for(rule, block, fine_block)):
            winner = rule
    if winner is None:
        return ratio
    if not isinstance(winner.ratio, str):
        return winner.ratio
    if draw is None:
        raise WeightsError(
            f"elemental rule {_format_rule(winner)!r} has a random ratio ({winner.ratio}) "
            "but no random source was given"
        )
    return draw(winner.ratio)


def uses_random(rules: Sequence[ElementalRule]) -> bool:
    """Whether any rule's ratio is random (R, U or X), so that a merge needs the dice.

    Example:
        >>> uses_random(parse_elemental("IN00::R", "sd1"))
        True
    """
    return any(isinstance(rule.ratio, str) for rule in rules)


def format_elemental(rules: Sequence[ElementalRule]) -> str:
    """Canonical text of ``rules`` (ranges written out) that parses back to equal rules.

    Example:
        >>> format_elemental(parse_elemental("NOT IN00-IN01 : attn : 0.50", "sd1"))
        'NOT IN00 IN01:attn:0.5'
    """
    return ", ".join(_format_rule(rule) for rule in rules)


# --- matching --------------------------------------------------------------


def _name_for(rule: ElementalRule, block: str, fine_block: str | None) -> str | None:
    """The name a rule compares with: the fine id for extended rules, else the block id."""
    if not rule.fine_blocks:
        return block
    if fine_block is None and rule.blocks:
        raise WeightsError(
            f"elemental rule {_format_rule(rule)!r} names extended SDXL blocks; "
            "pass the key's fine block (fine_block_of_sdxl)"
        )
    return fine_block


def _rule_matches(rule: ElementalRule, key: str, name: str | None) -> bool:
    """The original's flag logic: the block test, then the element test, each inverted by NOT."""
    if rule.blocks and (name in rule.blocks) == rule.blocks_negated:
        return False
    if not rule.elements:
        return True  # an empty list (NOT or not) takes every key, as in the original
    return any(element in key for element in rule.elements) != rule.elements_negated


# --- parsing ---------------------------------------------------------------


def _entries(text: str) -> list[str]:
    """The non-blank entries, split on commas and newlines."""
    return [entry.strip() for entry in re.split(r"[,\n]", text) if entry.strip()]


def _parse_entry(entry: str, names: tuple[str, ...], extended: bool) -> ElementalRule:
    """One ``Blocks:Elements:Ratio`` entry; anything else is an error naming the entry."""
    if entry.count(":") != 2:
        raise WeightsError(
            f"elemental entry {entry!r} is not Blocks:Elements:Ratio (exactly 2 colons), "
            "e.g. 'OUT03 OUT04:attn2:0.5' or 'NOT OUT04::1'"
        )
    blocks_text, elements_text, ratio_text = entry.split(":")
    blocks_negated, block_tokens = _split_not([token.upper() for token in blocks_text.split()])
    elements_negated, elements = _split_not(elements_text.split())
    return ElementalRule(
        blocks=_expand_blocks(block_tokens, names, entry),
        blocks_negated=blocks_negated,
        elements=tuple(elements),
        elements_negated=elements_negated,
        ratio=_parse_ratio(ratio_text, entry),
        fine_blocks=extended,
    )


def _split_not(tokens: list[str]) -> tuple[bool, list[str]]:
    """``['NOT', 'a']`` → ``(True, ['a'])``; only a leading NOT counts."""
    if tokens and tokens[0] == NOT:
        return True, tokens[1:]
    return False, tokens


def _expand_blocks(tokens: list[str], names: tuple[str, ...], entry: str) -> tuple[str, ...]:
    """Block ids with each ``FIRST-LAST`` range written out in layout order."""
    expanded: list[str] = []
    for token in tokens:
        if "-" in token:
            expanded.extend(_expand_range(token, names, entry))
        else:
            expanded.append(_check_block(token, names, entry))
    return tuple(expanded)


def _expand_range(token: str, names: tuple[str, ...], entry: str) -> tuple[str, ...]:
    """``IN05-IN03`` and ``IN03-IN05`` both give IN03, IN04, IN05, as the original's blocker."""
    parts = token.split("-")
    if len(parts) != 2:
        raise WeightsError(f"elemental entry {entry!r}: range {token!r} must be FIRST-LAST, e.g. 'IN00-IN05'")
    first, last = sorted(names.index(_check_block(part, names, entry)) for part in parts)
    return names[first : last + 1]


def _check_block(token: str, names: tuple[str, ...], entry: str) -> str:
    """``token`` as a canonical block id, or an error listing the valid ones."""
    name = BLOCK_ALIASES.get(token, token) if "M00" in names else token
    if name not in names:
        raise WeightsError(f"elemental entry {entry!r}: unknown block {token!r}; valid: {', '.join(names)}")
    return name


def _parse_ratio(text: str, entry: str) -> float | str:
    """A finite number, or the random letter R, U or X."""
    word = text.strip().upper()
    if word in RANDOM_RATIOS:
        return word
    value = finite_float(word)
    if value is None:
        raise WeightsError(f"elemental entry {entry!r}: ratio {text.strip()!r} is not a finite number or R, U, X")
    return value


def _block_names(layout: str, extended: bool) -> tuple[str, ...]:
    """The names rules may use: the layout's ids, or the 110 fine SDXL ids."""
    if layout not in LAYOUTS:
        raise WeightsError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not extended:
        return LAYOUTS[layout]
    if layout != "sdxl":
        raise WeightsError(f"extended (fine) block names exist for SDXL only, not {LAYOUT_LABELS[layout]}")
    return SDXL_FINE_BLOCKS


# --- formatting ------------------------------------------------------------


def _format_rule(rule: ElementalRule) -> str:
    """``Blocks:Elements:Ratio`` for one rule."""
    ratio = rule.ratio if isinstance(rule.ratio, str) else format_number(rule.ratio)
    blocks = _format_list(rule.blocks, rule.blocks_negated)
    elements = _format_list(rule.elements, rule.elements_negated)
    return f"{blocks}:{elements}:{ratio}"


def _format_list(items: tuple[str, ...], negated: bool) -> str:
    """Space-separated items after an optional ``NOT``."""
    return " ".join(((NOT,) if negated else ()) + items)
