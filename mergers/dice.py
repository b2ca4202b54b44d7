"""Let the dice roll: random block weights, drawn as the original SuperMerger draws them.

A :class:`Dice` says how to roll; :func:`roll` turns it into weight strings
for :func:`~mergers.weights.parse_weights`, plus the elemental entries and the
per-key draws that the ``ER``/``EU``/``EX`` modes (and any ``R``/``U``/``X``
ratio in an elemental entry) need. A seed gives the original's numbers.

How the original rolls (``smerge``, ``randdealer``, ``eratiodealer``,
``crazyslot``), and so how we do:

- one seed drives ``numpy.random.seed(seed); rand(3000)``; alpha reads draw
  ``i``, beta draw ``50 + i``, and the element ratio of the key at position
  ``k`` of model A draw ``100 + k`` (``RANDMAP``);
- the Random Mode becomes one letter per block (``R`` → ``R,R,…``), or the
  ``custom`` text; a value without commas is repeated for every block;
- per block, with ``r`` the draw: ``R = r``; ``U = 1.5 − 2r``;
  ``X = up + (low − up)·r``; ``D = up + low·(r − 0.5)`` (``up`` the midpoint,
  ``low`` the range); then clamped to ``[lower_clamp, upper_clamp]`` and
  written as ``str(round(value, round))`` (numpy's round for an unclamped
  numpy float, Python's for a bound that binds: they differ past 10 decimals);
- ``ER``/``EU``/``EX`` set the block to 0 and add an elemental entry
  ``"IN01 IN02::R"``, so each key of those blocks gets its own ratio:
  ``R = r``, ``U = 1 − 2r``, ``X`` as above, rounded, never clamped.

Where we depart from the original, and why:

- **SDXL** rolls 20 values. The original always rolls 26 (issue #467) and
  later drops IN09–IN11 and OUT09–OUT11; each SDXL block here reads the draw
  of the SD1 block of the same name (BASE 0, IN00–IN08 1–9, M00 13,
  OUT00–OUT08 14–22), so the values are the very numbers the original merges
  SDXL with. Limits take 20 values, or 26 read at those same positions.
  Elemental entries use SDXL's own block names (the original's are shifted,
  issue #468), and an ``X`` element ratio uses its own block's limits.
- **The ``aRp`` coin** (a lower limit ``0.5R0.3``: with chance 0.3 the low
  limit is 0.5, else ``X`` rolls 0 and ``D`` has no range) comes from
  ``random.Random(seed)``, alpha's blocks first, then beta's. The original
  tosses Python's unseeded global ``random``, so these coins cannot equal its.
- Where the original crashes we raise :class:`~mergers.errors.WeightsError`
  or pick the evident meaning: empty limit boxes mean their defaults (1s,
  0s); one value without commas serves every block in all four boxes; an
  ``X`` element ratio with an ``aRp`` lower limit uses ``a``; only the whole
  tokens ``ER``/``EU``/``EX`` are elemental (the original trips on any token
  with an ``E``, ``1e-3`` included); a key position past the 2900 draws is
  refused; ``round`` stops at 308, where numpy's round gives NaN.
- The names ``ALL_R``/``ALL_U``/``ALL_X`` stand for their letters (the
  original's dropdown writes the letters into the box). The 110-value
  "extend XL" layout is not supported.
- The original applies the Random Mode only in its "random" XY run; its
  Merge button rolls just the letters already in the weight boxes. Here a
  mode other than "off" replaces the selected sides' weights whoever calls
  :func:`roll`, and "off" rolls the letters in the given weights.
- Beta's ``E`` letters give zeros and no elemental entry, as in the original.

Seed −1 draws a fresh seed (from ``secrets``, in the original's range) and
returns it in :attr:`DiceRoll.seed`, so the merge can be replayed.
"""

from __future__ import annotations

import difflib
import numbers
import random
import secrets
from dataclasses import dataclass, field

import numpy as np

from mergers.arch.layouts import SD1_BLOCKS, block_ids
from mergers.errors import WeightsError
from mergers.weights import LAYOUT_LABELS, finite_float, sd1_to_sdxl

DICE_MODES = ("off", "R", "U", "X", "D", "ER", "EU", "EX", "custom")
DEFAULT_CUSTOM = "U,0,0,0,0,0,0,0,0,0,0,0,0,R,R,R,R,R,R,R,R,R,R,R,R,R"  # the original's box
DRAW_COUNT = 3000  # the original draws np.random.rand(3000) once per merge
DRAW_OFFSETS = {"alpha": 0, "beta": 50, "element": 100}  # the original's RANDMAP
SEED_LIMIT = 2**32 - 1  # the largest seed numpy's RandomState takes (the original's UI maximum too)
FRESH_SEED_BOUND = 4294967294  # seed −1: the original draws random.randrange(4294967294)
MAX_ROUND = 308  # numpy's round() scales by 10**round; past 1e308 that is inf and the value NaN
LIMIT_DEFAULTS = {"upper": "1", "lower": "0", "upper_clamp": "1", "lower_clamp": "0"}
LIMIT_FIELDS = tuple(LIMIT_DEFAULTS)
CHANCE_MARK = "R"  # a lower limit "aRp": low limit a with chance p
RANDOM_PRESETS = {"ALL_R": "R", "ALL_U": "U", "ALL_X": "X"}
ELEMENT_TOKENS = {"ER": "R", "EU": "U", "EX": "X"}
SD1_LENGTH = len(SD1_BLOCKS)

# r: the draw in [0, 1); low, up: the block's limits. Operand order as the
# original's, so that every float64 result is bit-for-bit the same.
BLOCK_FORMULAS = {
    "R": lambda r, low, up: r,
    "U": lambda r, low, up: -2 * r + 1.5,
    "X": lambda r, low, up: (low - up) * r + up,
    "D": lambda r, low, up: up + low * (r - 0.5),
}
ELEMENT_FORMULAS = {
    "R": lambda r, low, up: r,
    "U": lambda r, low, up: -2 * r + 1,  # 1, not the blocks' 1.5: the original's eratiodealer
    "X": BLOCK_FORMULAS["X"],
}
DICE_TOKENS = frozenset(BLOCK_FORMULAS) | frozenset(ELEMENT_TOKENS)


@dataclass(frozen=True)
class Dice:
    """How to roll random block weights; the original's "Let the Dice roll" panel.

    ``upper``/``lower`` are "Upper limit for X, mid point of D" and "Lower
    limit for X, range of D" (defaults 1s and 0s; ``lower`` entries may be
    ``aRp``); ``upper_clamp``/``lower_clamp`` are "Upper/Lower limit for X, D"
    (defaults 1s and 0s). Each is ``""``, one value, or one value per block.

    Example:
        >>> Dice(mode="U", seed=7).round
        3
    """

    mode: str = "off"
    seed: int = -1
    round: int = 3
    custom: str = DEFAULT_CUSTOM
    upper: str = ""
    lower: str = ""
    upper_clamp: str = ""
    lower_clamp: str = ""
    alpha: bool = True
    beta: bool = False

    def __post_init__(self) -> None:
        if self.mode not in DICE_MODES:
            near = difflib.get_close_matches(str(self.mode), DICE_MODES, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise WeightsError(
                f"mode {self.mode!r} is not a Random Mode; expected one of {', '.join(DICE_MODES)}{hint}"
            )
        if _whole("seed", self.seed) != -1:
            _check_whole("seed", self.seed, 0, SEED_LIMIT, "or -1 for a fresh seed")
        _check_whole("round", self.round, 0, MAX_ROUND, "decimals")
        for name in ("custom", *LIMIT_FIELDS):
            if not isinstance(getattr(self, name), str):
                raise WeightsError(f"{name} must be text; got {getattr(self, name)!r}")
        for name in ("alpha", "beta"):
            if not isinstance(getattr(self, name), bool):
                raise WeightsError(f"{name} must be True or False; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Limits:
    """The four limit boxes, one entry per block of a layout (``chance``: aRp's p or None).

    Example:
        >>> resolve_limits(Dice(upper="0.8"), "sd1").upper[:2]
        (0.8, 0.8)
    """

    upper: tuple[float, ...]
    lower: tuple[float, ...]
    chance: tuple[float | None, ...]
    upper_clamp: tuple[float, ...]
    lower_clamp: tuple[float, ...]


@dataclass(frozen=True)
class ElementDraws:
    """The per-key ratios of elemental ``R``/``U``/``X`` entries (the original's ``eratiodealer``).

    Example:
        >>> roll(Dice(mode="ER", seed=1), "sd1").elemental[:14]
        'BASE IN00 IN01'
    """

    draws: tuple[float, ...] = field(repr=False)
    upper: tuple[float, ...]
    lower: tuple[float, ...]
    digits: int

    def draw(self, letter: str, key_index: int, block_index: int) -> float:
        """The ratio for the key at ``key_index`` in model A's key order, in block ``block_index``.

        Example:
            >>> draws = roll(Dice(seed=5), "sd1").element_draws
            >>> draws.draw("U", 10, 0)  # 1 - 2 * rand(3000)[100 + 10], rounded
            0.185
        """
        formula = ELEMENT_FORMULAS.get(letter.strip()) if isinstance(letter, str) else None
        if formula is None:
            raise WeightsError(f"element ratio {letter!r} is not a random letter; expected R, U or X")
        index = DRAW_OFFSETS["element"] + _whole("key_index", key_index)
        if not DRAW_OFFSETS["element"] <= index < len(self.draws):
            top = len(self.draws) - DRAW_OFFSETS["element"] - 1
            raise WeightsError(f"key_index {key_index} is outside the draws; expected 0 to {top}")
        if not 0 <= _whole("block_index", block_index) < len(self.upper):
            raise WeightsError(f"block_index {block_index} is outside 0 to {len(self.upper) - 1}")
        value = formula(np.float64(self.draws[index]), self.lower[block_index], self.upper[block_index])
        # round() of a numpy float64 is numpy's round, as in the original.
        return float(round(value, self.digits))


@dataclass(frozen=True)
class DiceRoll:
    """What a roll gives: the seed used, the weight strings, the elemental entries, the element draws.

    Example:
        >>> roll(Dice(mode="EX", seed=3), "sdxl").weights_alpha.count("0")
        20
    """

    seed: int
    weights_alpha: str | None
    weights_beta: str | None
    elemental: str
    element_draws: ElementDraws


@dataclass(frozen=True)
class _Table:
    """Everything one roll deals from: the draws, the limits, the coins, the layout."""

    draws: np.ndarray
    limits: Limits
    digits: int
    coins: random.Random
    layout: str


def roll(dice: Dice, layout: str, *, weights_alpha: str | None = None, weights_beta: str | None = None) -> DiceRoll:
    """Roll ``dice`` for ``layout`` ("sd1" or "sdxl").

    With a Random Mode other than "off", the mode's pattern replaces the
    weights of each side that ``dice.alpha``/``dice.beta`` select; any other
    given weight string keeps its text, only its R/U/X/D/ER/EU/EX entries rolled.

    Example:
        >>> roll(Dice(mode="R", seed=1234), "sd1").weights_alpha.split(",")[:3]
        ['0.192', '0.622', '0.438']
    """
    _layout_ids(layout)
    seed = fresh_seed() if dice.seed == -1 else int(dice.seed)
    limits = resolve_limits(dice, layout)
    draws = np.random.RandomState(seed).rand(DRAW_COUNT)
    table = _Table(draws, limits, int(dice.round), random.Random(seed), layout)
    alpha, elements = _deal(_source(dice, layout, dice.alpha, weights_alpha), "alpha", table)
    beta, _ = _deal(_source(dice, layout, dice.beta, weights_beta), "beta", table)
    element_draws = ElementDraws(tuple(draws.tolist()), limits.upper, limits.lower, table.digits)
    return DiceRoll(seed, alpha, beta, elemental_text(elements), element_draws)


def mode_pattern(dice: Dice, layout: str) -> str:
    """The letters a Random Mode rolls, one per block (the original's ``crazyslot``).

    Example:
        >>> mode_pattern(Dice(mode="EU"), "sdxl").split(",")[:3]
        ['EU', 'EU', 'EU']
    """
    text = dice.custom if dice.mode == "custom" else dice.mode
    entries = text.split(",")
    if len(entries) == 1:
        entries = entries * len(_layout_ids(layout))
    if dice.mode == "custom":
        for position, entry in enumerate(entries, 1):
            if entry.strip() not in DICE_TOKENS:
                _number(entry, "custom", position)
    return ",".join(entries)


def resolve_limits(dice: Dice, layout: str) -> Limits:
    """The dice's four limit boxes read for ``layout``: one entry per block, defaults filled in.

    Example:
        >>> resolve_limits(Dice(lower="0.5R0.3"), "sdxl").chance[:2]
        (0.3, 0.3)
    """
    numbers_of = {
        name: tuple(_number(entry, name, i) for i, entry in enumerate(_limit_entries(dice, name, layout), 1))
        for name in ("upper", "upper_clamp", "lower_clamp")
    }
    lower = [_lower_entry(entry, i) for i, entry in enumerate(_limit_entries(dice, "lower", layout), 1)]
    return Limits(
        upper=numbers_of["upper"],
        lower=tuple(value for value, _ in lower),
        chance=tuple(chance for _, chance in lower),
        upper_clamp=numbers_of["upper_clamp"],
        lower_clamp=numbers_of["lower_clamp"],
    )


def elemental_text(elements: list[tuple[str, str]]) -> str:
    """Elemental entries for ``(block id, letter)`` pairs, one ``"IN01 IN02::R"`` per letter, R, U, X.

    Example:
        >>> elemental_text([("IN01", "R"), ("M00", "X"), ("IN02", "R")])
        'IN01 IN02::R,M00::X'
    """
    groups: dict[str, list[str]] = {letter: [] for letter in ELEMENT_FORMULAS}
    for block_id, letter in elements:
        groups[letter].append(block_id)
    return ",".join(f"{' '.join(ids)}::{letter}" for letter, ids in groups.items() if ids)


def fresh_seed() -> int:
    """A new seed from the system's entropy, in the original's range 0…4294967293.

    Example:
        >>> 0 <= fresh_seed() < FRESH_SEED_BOUND
        True
    """
    return secrets.randbelow(FRESH_SEED_BOUND)


# --- dealing one weight string ----------------------------------------------


def _source(dice: Dice, layout: str, rolled: bool, given: str | None) -> str | None:
    """The text one side deals: the mode's pattern when the dice roll that side, else ``given``."""
    if dice.mode != "off" and rolled:
        return mode_pattern(dice, layout)
    return given


def _deal(text: str | None, side: str, table: _Table) -> tuple[str | None, list[tuple[str, str]]]:
    """Roll each dice token of ``text``; other entries stay as written (the original's ``randdealer``)."""
    if text is None:
        return None, []
    if not isinstance(text, str):
        raise WeightsError(f"weights_{side} must be text or None; got {text!r}")
    letter = RANDOM_PRESETS.get(text.strip())
    if letter is not None:
        text = ",".join([letter] * len(block_ids(table.layout)))
    entries = text.split(",")
    if not any(entry.strip() in DICE_TOKENS for entry in entries):
        return text, []
    entries = _per_block(entries, f"weights_{side}", table.layout)
    ids = block_ids(table.layout)
    out, elements = [], []
    for block, entry in enumerate(entries):
        token = entry.strip()
        if token in ELEMENT_TOKENS:
            out.append("0")
            elements.append((ids[block], ELEMENT_TOKENS[token]))
        elif token in BLOCK_FORMULAS:
            out.append(_roll_block(token, block, side, table))
        else:
            out.append(entry)
    return ",".join(out), elements


def _roll_block(letter: str, block: int, side: str, table: _Table) -> str:
    """One block's rolled value as the original writes it: ``str(round(clamped, round))``."""
    draw = table.draws[_draw_position(table.layout, block) + DRAW_OFFSETS[side]]
    low, up = _block_limits(letter, block, table)
    value = BLOCK_FORMULAS[letter](draw, low, up)
    limits = table.limits
    # min() then max(), as the original's limitter: a bound that binds comes back as
    # a Python float (Python's round), otherwise the numpy float64 stays (numpy's
    # round); the two differ from the 11th decimal on.
    value = max(min(value, limits.upper_clamp[block]), limits.lower_clamp[block])
    return str(round(value, table.digits))


def _block_limits(letter: str, block: int, table: _Table) -> tuple[float, float]:
    """``(low, up)`` for one block, after the aRp coin for X and D."""
    limits = table.limits
    low, up, chance = limits.lower[block], limits.upper[block], limits.chance[block]
    if letter not in ("X", "D") or chance is None or table.coins.random() <= chance:
        return low, up
    # Tails: X rolls between 0 and 0; D keeps its midpoint with no range (the original).
    return 0.0, (0.0 if letter == "X" else up)


def _draw_position(layout: str, block: int) -> int:
    """The draw a block reads: its SD1 position, so SDXL gets the numbers the original merges."""
    if layout not in DICE_LAYOUTS:
        raise WeightsError(f"the dice roll SD1/SD2 and SDXL block weights only, not {LAYOUT_LABELS[layout]}: "
                           "type this model's block weights instead")
    return block_ids("sd1").index(block_ids(layout)[block])


# --- reading the boxes ------------------------------------------------------


def _limit_entries(dice: Dice, name: str, layout: str) -> list[str]:
    """One raw entry per block from a limit box: "" is the default, one value serves all."""
    text = getattr(dice, name).strip() or LIMIT_DEFAULTS[name]
    entries = text.split(",")
    if len(entries) == 1:
        return entries * len(_layout_ids(layout))
    return _per_block(entries, name, layout)


def _per_block(entries: list[str], name: str, layout: str) -> list[str]:
    """``entries`` as one per block of ``layout``; 26 for SDXL are read at the SD1 positions."""
    ids = _layout_ids(layout)
    if layout == "sdxl" and len(entries) == SD1_LENGTH:
        return sd1_to_sdxl(entries)
    if len(entries) != len(ids):
        extra = f" (or {SD1_LENGTH})" if layout == "sdxl" else ""
        raise WeightsError(
            f"{name} needs one value per {LAYOUT_LABELS[layout]} block, {len(ids)}{extra}; got {len(entries)}"
        )
    return entries


def _lower_entry(entry: str, position: int) -> tuple[float, float | None]:
    """A lower-limit entry: a number, or ``aRp`` (low limit ``a`` with chance ``p``)."""
    if CHANCE_MARK not in entry:
        return _number(entry, "lower", position), None
    value, _, chance = entry.partition(CHANCE_MARK)
    if CHANCE_MARK in chance:
        raise WeightsError(f"lower value {position} ({entry!r}) has more than one R; expected e.g. 0.5R0.3")
    return _number(value, "lower", position), _number(chance, "lower", position)


def _number(entry: str, name: str, position: int) -> float:
    """A finite number from one box entry, or a WeightsError naming the box and the entry."""
    value = finite_float(entry)
    if value is None:
        raise WeightsError(f"{name} value {position} ({entry!r}) is not a finite number")
    return value


def _check_whole(name: str, value: object, low: int, high: int, note: str) -> None:
    """Refuse anything but a whole number from ``low`` to ``high``."""
    if _whole(name, value) < low or value > high:
        raise WeightsError(f"{name} {value!r} is out of range; expected {low} to {high} ({note})")


def _whole(name: str, value: object) -> int:
    """``value`` as an int; True/False, floats and text are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise WeightsError(f"{name} must be a whole number; got {value!r}")
    return int(value)


# The original's dice deal SD1 positions (SDXL reads its blocks' SD1 positions); nothing more.
DICE_LAYOUTS = ("sd1", "sdxl")


def _layout_ids(layout: str) -> tuple[str, ...]:
    """The layout's block ids; a WeightsError for an unknown layout."""
    if layout not in LAYOUT_LABELS:
        raise WeightsError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUT_LABELS)}")
    return block_ids(layout)
