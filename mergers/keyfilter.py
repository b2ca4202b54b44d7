"""Include / Exclude: choose which keys merge and which stay as model A.

The original SuperMerger's "Include/Exclude" panel (``excluder``) has a mode,
block checkboxes and a text box of key substrings:

- **Exclude**: keys that match stay as model A; the rest merge as usual.
- **Include**: only keys that match merge; all others stay as model A.
- **Off**, or nothing chosen: every key merges.

A key matches when its block is one of the checked blocks, its fine SDXL block
(such as ``IN411``) is checked or typed as an element, it is one of the six
Adjust keys and "Adjust" is checked, it holds one of the elements, or it is a
VAE key (``first_stage_model``) and "VAE" is checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mergers.adjust import ADJUST_KEYS
from mergers.arch.blocks import SDXL_FINE_BLOCKS, block_of, fine_block_of_sdxl, merges_by_name
from mergers.arch.keys import key_specs
from mergers.arch.layouts import LAYOUTS, SD1_BLOCKS, block_ids
from mergers.errors import WeightsError

FILTER_EXTRAS = ("Adjust", "VAE")
# The original's EXCLUDE_CHOICES: the 26 SD1 block ids, then Adjust and VAE.
FILTER_CHOICES: tuple[str, ...] = SD1_BLOCKS + FILTER_EXTRAS
FILTER_MODES = ("off", "include", "exclude")
NOT = "NOT"
PRINT_OPTION = "print"  # the original's logging switch among the checked blocks; not a block
VAE_PREFIX = "first_stage_model"
# A real checkpoint stands for each layout when the caller gives no key list.
LAYOUT_FAMILIES = {"sd1": "sd1", "sdxl": "sdxl", "flux": "flux", "sd3": "sd3", "sd3_large": "sd3"}


@dataclass(frozen=True)
class KeyFilter:
    """An Include/Exclude setting: the mode, the chosen blocks and the key substrings.

    Example:
        >>> KeyFilter("Exclude", ("IN04",)).mode
        'exclude'
    """

    mode: str = "off"  # "off" | "include" | "exclude" (the original's "Off"/"Include"/"Exclude" too)
    blocks: tuple[str, ...] = ()  # block ids and/or fine SDXL ids, "VAE", "Adjust"
    elements: tuple[str, ...] = ()  # key substrings

    def __post_init__(self) -> None:
        mode = self.mode.strip().lower()
        if mode not in FILTER_MODES:
            raise WeightsError(f"unknown include/exclude mode {self.mode!r}; expected Off, Include or Exclude")
        # Frozen: normalised fields must go in through object.__setattr__.
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "elements", tuple(self.elements))

    @property
    def active(self) -> bool:
        """Whether the filter changes anything: a mode other than off, and something chosen.

        Example:
            >>> KeyFilter("include").active
            False
        """
        return self.mode != "off" and bool(self.blocks or self.elements)


def filter_choices(layout: str) -> tuple[str, ...]:
    """The checkbox choices for ``layout``: its block ids, then Adjust and VAE.

    Example:
        >>> filter_choices("sdxl")[-3:]
        ('OUT08', 'Adjust', 'VAE')
    """
    return _layout_ids(layout) + FILTER_EXTRAS


def parse_key_filter(mode: str, blocks: str | Sequence[str] = (), elements: str = "", *, layout: str) -> KeyFilter:
    """Build a filter from the panel: ``blocks`` as checkbox values or text, ``elements`` comma-separated.

    Text blocks are separated by spaces or commas; a leading ``NOT`` takes every choice but those.

    Example:
        >>> parse_key_filter("Exclude", "IN04 VAE", "attn2, ff.net", layout="sd1").elements
        ('attn2', 'ff.net')
    """
    names = _parse_blocks(blocks, layout)
    # Stripped, unlike the original, where "a, b" leaves " b", which no key holds.
    substrings = tuple(part.strip() for part in elements.split(",") if part.strip())
    return KeyFilter(mode, names, substrings)


def stays_as_a(f: KeyFilter, key: str, block: str | None, *, fine_block: str | None = None) -> bool:
    """Whether ``key`` (in ``block``; SDXL fine id ``fine_block``) keeps model A's value.

    Example:
        >>> stays_as_a(KeyFilter("include", ("OUT05",)), "model.diffusion_model.out.0.bias", "OUT11")
        True
    """
    if not f.active:
        return False
    matched = filter_match(f, key, block, fine_block=fine_block) is not None
    return matched != (f.mode == "include")


def filter_match(f: KeyFilter, key: str, block: str | None, *, fine_block: str | None = None) -> str | None:
    """What in ``f`` matches ``key``: the first hit in the original's order of checks, or None.

    Example:
        >>> filter_match(KeyFilter("exclude", ("VAE",), ("attn",)), "first_stage_model.mid.attn_1.k.bias", "BASE")
        'attn'
    """
    own = fine_block if fine_block is not None else block  # the original's name for the key
    checks = (
        (block, block in f.blocks),
        (own, own in f.elements or _fine_block_chosen(f, fine_block)),
        ("Adjust", "Adjust" in f.blocks and key in ADJUST_KEYS),
        *((element, element in key) for element in f.elements),
        ("VAE", "VAE" in f.blocks and VAE_PREFIX in key),
    )
    return next((str(target) for target, hit in checks if hit), None)


def zeroed_weights(
    f: KeyFilter, values: Sequence[float], layout: str, *, keys: Iterable[str] | None = None
) -> tuple[float, ...]:
    """Block weights with each block that has a key kept as A set to 0 (the original's ``weights_alpha_orig``).

    ``keys`` are the checkpoint's keys; by default those of a real pruned checkpoint of the layout
    (no EMA copies: the original merges them too, with BASE's ratio, when both models have them).

    Example:
        >>> zeroed_weights(KeyFilter("exclude", ("IN01",)), (1.0,) * 26, "sd1")[:3]
        (1.0, 1.0, 0.0)
    """
    ids = _layout_ids(layout)
    if len(values) != len(ids):
        raise WeightsError(f"{len(ids)} block weights expected for the {layout!r} layout; got {len(values)}")
    kept = _blocks_kept_as_a(f, layout, keys)
    return tuple(0.0 if block in kept else float(value) for block, value in zip(ids, values))


# --- helpers ---------------------------------------------------------------


def _fine_block_chosen(f: KeyFilter, fine_block: str | None) -> bool:
    """A checked fine SDXL id; one spelled like an SDXL block id (OUT01) means that block instead."""
    return fine_block is not None and fine_block not in LAYOUTS["sdxl"] and fine_block in f.blocks


def _blocks_kept_as_a(f: KeyFilter, layout: str, keys: Iterable[str] | None) -> set[str]:
    """Blocks with at least one merged key that the filter keeps as A."""
    if not f.active:
        return set()
    if keys is None:  # layouts without a real key list (Qwen-Image, automatic…) are told their keys
        family = LAYOUT_FAMILIES.get(layout)
        keys = (spec.key for spec in key_specs(family) if not spec.optional) if family else ()
    kept = set()
    for key in keys:
        # The keys the original's merge loop reaches before it records exclusions; newer layouts merge
        # keys without "model" (bare diffusion keys), so their own name test decides.
        original = layout in LAYOUT_FAMILIES
        if (original and "model" not in key) or not merges_by_name(key, layout):
            continue
        block = block_of(key, layout)
        fine = fine_block_of_sdxl(key) if layout == "sdxl" else None
        if block is not None and stays_as_a(f, key, block, fine_block=fine):
            kept.add(block)
    return kept


def _parse_blocks(blocks: str | Sequence[str], layout: str) -> tuple[str, ...]:
    """Validated block choices; ``print`` is dropped, a leading ``NOT`` complements them."""
    tokens = re.split(r"[\s,]+", blocks.strip()) if isinstance(blocks, str) else [b.strip() for b in blocks]
    tokens = [token for token in tokens if token and token != PRINT_OPTION]
    choices = filter_choices(layout)
    if tokens and tokens[0] == NOT:
        named = {_check_block(token, layout) for token in tokens[1:]}
        return tuple(choice for choice in choices if choice not in named)
    return tuple(_check_block(token, layout) for token in tokens)


def _check_block(token: str, layout: str) -> str:
    """``token`` if it is a choice of ``layout`` (or a fine SDXL id), else an error listing them."""
    fine = SDXL_FINE_BLOCKS if layout == "sdxl" else ()
    if token in filter_choices(layout) or token in fine:
        return token
    extra = " (or a fine SDXL id such as IN411)" if fine else ""
    raise WeightsError(
        f"unknown include/exclude block {token!r} for the {layout!r} layout; "
        f"valid: {', '.join(filter_choices(layout))}{extra}"
    )


def _layout_ids(layout: str) -> tuple[str, ...]:
    """The layout's block ids; a WeightsError for an unknown layout."""
    if layout not in LAYOUTS:
        raise WeightsError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return block_ids(layout)
