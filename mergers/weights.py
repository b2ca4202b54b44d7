"""Block weights: parse the weights box into one number per U-Net block.

A weight string says how much of model B goes into each block of the merge.
:func:`parse_weights` accepts three forms, told apart by their content:

1. **Numbers** (no ``:`` in the text): a comma list, exactly as the original
   SuperMerger takes it. Layout ``sd1`` needs 26 values (BASE, IN00…IN11, M00,
   OUT00…OUT11). Layout ``sdxl`` needs 20 (BASE, IN00…IN08, M00, OUT00…OUT08),
   or 26, which are converted as the original does: BASE, IN00…IN08, M00 and
   OUT00…OUT08 are kept; IN09…IN11 and OUT09…OUT11 are dropped. Layout ``flux``
   needs 61 (CLIP, T5, IN, D00…D18, S00…S37, OUT, as the original's Forge
   support names them); ``sd3`` 28 and ``sd3_large`` 42 (CLIP, T5, IN, J00…,
   OUT). Every other layout (Qwen-Image, Wan, an automatic one…) needs one value
   per block id it lists (docs/architectures.md). Spaces and newlines around values are fine::

       0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1

2. **A preset name** (one line, no comma, no ``:``): replaced by that preset's
   values, then read as form 1. The shipped presets are the original's
   (``mergers/data/mbw_presets.tsv``); yours go in ``$SUPERMERGER_PRESETS`` or
   ``~/.config/supermerger/mbw_presets.tsv``, one ``NAME<TAB>values`` (or
   ``NAME:values``) per line, and override shipped ones of the same name. A
   26-value preset scales to any other layout (not SDXL, which converts as the
   original does): its first value goes to the text-encoder blocks (BASE, TE,
   CLIP, T5, VAE), the other 25 are read as a curve over the remaining blocks
   in order, so GRAD_V is a V over Flux's 61 blocks as over SD1's 26::

       GRAD_V

3. **Readable** (any ``:`` in the text): ``SELECTOR:VALUE`` entries separated
   by commas or newlines. Later entries win, so start with a default and then
   make exceptions. Every block must get a value. Selectors, case-insensitive:

   - a block id: ``BASE``, ``IN03``, ``M00`` (also ``MID``), ``OUT11``;
   - a range of ids in layout order, which may cross groups: ``IN00-IN05``,
     ``IN06-OUT03``;
   - a group: ``IN`` (every input block), ``OUT`` (every output block); for Flux
     ``D`` (every double block) and ``S`` (every single block), for SD3 ``J``
     (every joint block); in any layout, the letters of its numbered ids;
   - ``ALL`` or ``*``: every block, BASE included.

   ::

       BASE:0, IN00-IN05:0.3, IN06-OUT11:1
       ALL:0.5, M00:1

   :meth:`BlockWeights.as_readable` writes this form, and
   :meth:`BlockWeights.as_text` writes form 1; both read back to equal weights.

Random tokens (``R``, ``U``, ``X``, presets ``ALL_R``/``ALL_U``/``ALL_X``) are
refused for now. Every bad input raises :class:`~mergers.errors.WeightsError`
naming the value at fault and what was expected.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import math
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mergers.arch.layouts import block_ids
from mergers.arch.registry import layout_named, registry
from mergers.errors import ArchitectureError, WeightsError


class _LayoutLabels(Mapping):
    """``LAYOUT_LABELS[layout]``: what messages call a layout ("SD1/SD2", "Flux", "Qwen-Image", "automatic")."""

    def __getitem__(self, layout: str) -> str:
        try:
            return layout_named(layout).label
        except ArchitectureError as error:
            raise KeyError(layout) from error

    def __iter__(self):
        return iter(registry().layouts)

    def __len__(self) -> int:
        return len(registry().layouts)


LAYOUT_LABELS: Mapping[str, str] = _LayoutLabels()
SD1_PRESET_LENGTH = 26  # the shipped presets: BASE, IN00…IN11, M00, OUT00…OUT11
# Blocks that take a scaled preset's first (BASE) value: the parts outside the diffusion model.
BASE_LIKE_BLOCKS = frozenset({"BASE", "TE", "CLIP", "T5", "VAE"})
RANDOM_TOKENS = frozenset({"R", "U", "X"})
# The original adds these random presets to its dropdown; they need the dice.
RANDOM_PRESETS = frozenset({"ALL_R", "ALL_U", "ALL_X"})
ID_ALIASES = {"MID": "M00"}
PRESET_HEADER = "preset_name"
SHIPPED_PRESETS = "data/mbw_presets.tsv"
USER_PRESETS_ENV = "SUPERMERGER_PRESETS"
_ID_PATTERN = re.compile(r"([A-Z_]+?)(\d{1,3})")


@dataclass(frozen=True)
class BlockWeights:
    """One weight per block of ``layout``, in :func:`block_ids` order.

    Example:
        >>> BlockWeights("sdxl", (0.0,) + (1.0,) * 19).value_of("M00")
        1.0
    """

    layout: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        ids = _layout_ids(self.layout)
        try:
            values = tuple(float(v) for v in self.values)
        except (TypeError, ValueError) as error:
            raise WeightsError(f"weights must be numbers; got {self.values!r}") from error
        if len(values) != len(ids):
            raise _count_error(self.layout, len(values))
        for position, value in enumerate(values, 1):
            if not math.isfinite(value):
                raise WeightsError(f"value {position} ({value!r}) is not a finite number")
        # Frozen: the coerced tuple must go in through object.__setattr__.
        object.__setattr__(self, "values", values)

    def value_of(self, block_id: str) -> float:
        """The weight of one block (case-insensitive; ``MID`` means M00).

        Example:
            >>> parse_weights("ALL:0.5, OUT02:1", "sd1").value_of("out02")
            1.0
        """
        return self.values[_block_index(block_id, self.layout)]

    def as_text(self) -> str:
        """The canonical comma list, each number in its shortest exact form.

        Example:
            >>> parse_weights("ALL:1, BASE:0.5", "sdxl").as_text()[:12]
            '0.5,1,1,1,1,'
        """
        return ",".join(format_number(v) for v in self.values)

    def as_readable(self) -> str:
        """The readable form, runs of equal values written as one range.

        Example:
            >>> parse_weights("ALL:1, BASE:0, IN00-IN05:0.3", "sd1").as_readable()
            'BASE:0, IN00-IN05:0.3, IN06-OUT11:1'
        """
        if len(set(self.values)) == 1:
            return f"ALL:{format_number(self.values[0])}"
        ids = block_ids(self.layout)
        # The first id (BASE: text encoder and VAE; Flux/SD3: CLIP) stays its own entry: it is no U-Net block.
        entries = [f"{ids[0]}:{format_number(self.values[0])}"]
        for start, end in equal_runs(self.values[1:]):
            span = _span_text(ids[start + 1], ids[end + 1])
            entries.append(f"{span}:{format_number(self.values[start + 1])}")
        return ", ".join(entries)


def format_number(value: float) -> str:
    """The shortest text that reads back as exactly ``value``; no trailing ``.0``.

    Example:
        >>> [format_number(v) for v in (1.0, 0.5, 0.0833333333)]
        ['1', '0.5', '0.0833333333']
    """
    text = repr(float(value))
    return text.removesuffix(".0")


def equal_runs(values: Sequence[float]) -> list[tuple[int, int]]:
    """``(first, last)`` index pairs of the runs of equal neighbours in ``values``.

    Example:
        >>> equal_runs([0, 0, 1, 0])
        [(0, 1), (2, 2), (3, 3)]
    """
    runs: list[tuple[int, int]] = []
    for index, value in enumerate(values):
        if runs and values[runs[-1][1]] == value:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def parse_weights(
    text: str, layout: str, *, presets: Mapping[str, str] | None = None
) -> BlockWeights:
    """Read a weight string (numbers, preset name or readable form) for ``layout``.

    Example:
        >>> parse_weights("GRAD_V", "sdxl").values[:3]
        (0.0, 1.0, 0.9166666667)
    """
    _layout_ids(layout)
    stripped = text.strip()
    if not stripped:
        raise WeightsError(
            f"the weight string is empty; expected {len(block_ids(layout))} numbers, "
            "a preset name (e.g. GRAD_V) or a readable form (e.g. 'ALL:0.5')"
        )
    if ":" in stripped:
        return _parse_readable(stripped, layout)
    if not re.search(r"[,\n]", stripped) and not _is_number(stripped):
        # Presets are looked up only now, so a broken user file cannot break numbers.
        table = load_presets() if presets is None else presets
        return _parse_preset(stripped, layout, table)
    return _parse_number_list(stripped, layout)


# --- form 1: numbers -------------------------------------------------------


def _parse_number_list(text: str, layout: str) -> BlockWeights:
    """Form 1: a comma list; 26 values for sdxl are converted like the original."""
    tokens = text.split(",")
    values = [parse_number(token, f"value {i}") for i, token in enumerate(tokens, 1)]
    if layout == "sdxl" and len(values) == len(block_ids("sd1")):
        values = sd1_to_sdxl(values)
    if len(values) != len(block_ids(layout)):
        raise _count_error(layout, len(values))
    return BlockWeights(layout, tuple(values))


def sd1_to_sdxl(values: Sequence[float]) -> list[float]:
    """The original's ``weighttoxl``: 26 values → 20, dropping IN09–11 and OUT09–11.

    Example:
        >>> sd1_to_sdxl(list(range(26)))[9:12]
        [9, 13, 14]
    """
    rest = list(values[1:])
    # Of the 25 non-BASE values: IN00..IN08 are [0:9], M00 and OUT00..OUT08 are [12:22].
    return [values[0], *rest[:9], *rest[12:22]]


def finite_float(text: str) -> float | None:
    """``text`` as a finite float, or None when it is not a number, NaN or infinite.

    Example:
        >>> finite_float("0.5"), finite_float("nan"), finite_float("R")
        (0.5, None, None)
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_number(token: str, label: str) -> float:
    """One finite weight from ``token``; ``label`` says where it came from in errors.

    Example:
        >>> parse_number(" 0.25 ", "value 3")
        0.25
    """
    text = token.strip()
    if text.upper() in RANDOM_TOKENS:
        raise WeightsError(
            f"{label} ({text!r}) is a random token; random values (R, U, X) "
            "are not supported in a weight string yet"
        )
    if not _is_number(text):
        raise WeightsError(f"{label} ({text!r}) is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise WeightsError(
            f"{label} ({text!r}) is not a finite number; NaN and infinity are not weights"
        )
    return value


def _is_number(text: str) -> bool:
    """Whether ``float`` accepts ``text`` (NaN and infinity included; checked later)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _count_error(layout: str, count: int) -> WeightsError:
    """The wrong-number-of-values error, listing what ``layout`` takes."""
    needed = len(block_ids(layout))
    extra = " or 26 (converted)" if layout == "sdxl" else ""
    return WeightsError(
        f"weights for {LAYOUT_LABELS[layout]} need {needed} values "
        f"({layout_named(layout).shape_text}){extra}; got {count}"
    )


# --- form 2: preset name ---------------------------------------------------


def _parse_preset(name: str, layout: str, presets: Mapping[str, str]) -> BlockWeights:
    """Form 2: substitute the preset's values, then read them as numbers."""
    found = _find_preset(name, presets)
    if found is None:
        raise _unknown_preset_error(name, presets)
    try:
        return _parse_number_list(_scaled_preset(presets[found].strip(), layout), layout)
    except WeightsError as error:
        raise WeightsError(f"preset {found!r}: {error}") from error


def _scaled_preset(text: str, layout: str) -> str:
    """A 26-value preset stretched over ``layout``'s blocks (not SD1/SDXL's, which take it as it is)."""
    values = text.split(",")
    if layout in ("sd1", "sdxl") or len(values) != SD1_PRESET_LENGTH:
        return text
    numbers = [parse_number(value, f"value {n}") for n, value in enumerate(values, 1)]
    return ",".join(format_number(v) for v in scale_preset(numbers, block_ids(layout)))


def scale_preset(values: Sequence[float], ids: Sequence[str]) -> list[float]:
    """26 SD1 values over other block ids: BASE to the text encoders, the 25 U-Net values as a curve.

    Each remaining block reads the curve at its relative position, linearly between neighbours.

    Example:
        >>> scale_preset([0] + [float(n) for n in range(25)], ["CLIP", "IN", "D00", "OUT"])
        [0, 0.0, 12.0, 24.0]
    """
    curve, body = list(values[1:]), [block for block in ids if block not in BASE_LIKE_BLOCKS]
    scaled = {block: _curve_at(curve, n / max(1, len(body) - 1)) for n, block in enumerate(body)}
    return [values[0] if block in BASE_LIKE_BLOCKS else scaled[block] for block in ids]


def _curve_at(curve: Sequence[float], where: float) -> float:
    """The value of ``curve`` (evenly spaced over 0…1) at ``where``, linearly interpolated."""
    position = where * (len(curve) - 1)
    low = min(int(position), len(curve) - 2)
    share = position - low
    return round(curve[low] * (1 - share) + curve[low + 1] * share, 10)


def _find_preset(name: str, presets: Mapping[str, str]) -> str | None:
    """The preset key for ``name``: exact, else the one case-insensitive match."""
    if name in presets:
        return name
    matches = [key for key in presets if key.upper() == name.upper()]
    return matches[0] if len(matches) == 1 else None


def _unknown_preset_error(name: str, presets: Mapping[str, str]) -> WeightsError:
    """The error for a word that names no preset, with the nearest names."""
    if name.upper() in RANDOM_TOKENS | RANDOM_PRESETS:
        return WeightsError(
            f"{name!r} asks for random values (R, U, X; ALL_R, ALL_U, ALL_X), "
            "which are not supported in a weight string yet"
        )
    by_upper = {key.upper(): key for key in presets}
    close = difflib.get_close_matches(name.upper(), list(by_upper), n=3, cutoff=0.5)
    hint = (
        "did you mean " + ", ".join(by_upper[c] for c in close) + "?"
        if close
        else f"expected one of the {len(presets)} preset names, numbers, or a readable form like 'ALL:0.5'"
    )
    return WeightsError(f"unknown preset {name!r}; {hint}")


# --- form 3: readable ------------------------------------------------------


def _parse_readable(text: str, layout: str) -> BlockWeights:
    """Form 3: ``SELECTOR:VALUE`` entries; later ones win; all blocks needed."""
    ids = block_ids(layout)
    assigned: dict[int, float] = {}
    for entry in _readable_entries(text):
        selector, value_text = _split_entry(entry)
        value = parse_number(value_text, f"value of {selector!r}")
        for index in _select(selector, layout):
            assigned[index] = value
    missing = [i for i in range(len(ids)) if i not in assigned]
    if missing:
        raise _uncovered_error(missing, ids)
    return BlockWeights(layout, tuple(assigned[i] for i in range(len(ids))))


def _readable_entries(text: str) -> list[str]:
    """The non-blank entries, split on commas and newlines."""
    return [entry.strip() for entry in re.split(r"[,\n]", text) if entry.strip()]


def _split_entry(entry: str) -> tuple[str, str]:
    """``'IN03: 0.5'`` → ``('IN03', '0.5')``; refuses entries without both parts."""
    selector, colon, value = entry.partition(":")
    if not colon or not selector.strip() or not value.strip():
        raise WeightsError(
            f"entry {entry!r} is not SELECTOR:VALUE (e.g. 'IN03:0.5', 'IN00-IN05:1', 'ALL:0')"
        )
    return selector.strip(), value.strip()


def _select(selector: str, layout: str) -> range | list[int]:
    """Indices (into the layout's ids) that ``selector`` covers."""
    ids = block_ids(layout)
    word = selector.upper()
    if word in ("ALL", "*"):
        return range(len(ids))
    if word in layout_named(layout).groups:
        return [i for i, block in enumerate(ids) if block == word or _letters(block) == word]
    if "-" in word:
        return _range_indices(selector, layout)
    return [_block_index(selector, layout)]


def _range_indices(selector: str, layout: str) -> range:
    """``'IN06-OUT03'`` → the indices from IN06 to OUT03 inclusive, in layout order."""
    parts = selector.split("-")
    if len(parts) != 2:
        raise WeightsError(f"range {selector!r} must be FIRST-LAST, e.g. 'IN00-IN05'")
    first, last = (_block_index(part, layout) for part in parts)
    if first > last:
        ids = block_ids(layout)
        raise WeightsError(
            f"range {selector!r} runs backwards; write it in layout order "
            f"({ids[last]}-{ids[first]})"
        )
    return range(first, last + 1)


def _block_index(block_id: str, layout: str) -> int:
    """Position of ``block_id`` in the layout (case-insensitive, ``MID``, ``IN3``)."""
    ids = _layout_ids(layout)
    canonical = _canonical_id(block_id, ids)
    if canonical not in ids:
        raise WeightsError(
            f"{block_id.strip()!r} is not a block of the {LAYOUT_LABELS[layout]} layout; "
            f"valid ids: {layout_named(layout).shape_text} (and MID, IN, OUT, ALL or *)"
        )
    return ids.index(canonical)


def _canonical_id(block_id: str, ids: Sequence[str]) -> str:
    """``' mid '`` → ``'M00'``, ``'in3'`` → ``'IN03'`` (the padding the layout's ids use); else upper-cased."""
    word = block_id.strip().upper()
    word = ID_ALIASES.get(word, word)
    match = _ID_PATTERN.fullmatch(word)
    if word in ids or not match:
        return word
    padded = (f"{match[1]}{int(match[2]):0{width}d}" for width in (2, 3))
    return next((candidate for candidate in padded if candidate in ids), word)


def _letters(block: str) -> str:
    """The letters of a numbered id ("D03" → "D"); the whole id when it has no number."""
    match = re.fullmatch(r"([A-Z_]+?)\d+", block)
    return match[1] if match else block


def _uncovered_error(missing: Iterable[int], ids: Sequence[str]) -> WeightsError:
    """The error listing blocks that no entry gave a value."""
    missing = list(missing)
    spans = []
    for start, end in _consecutive_runs(missing):
        spans.append(_span_text(ids[start], ids[end]))
    return WeightsError(
        f"no value for {', '.join(spans)}; give them an entry, "
        "or start with 'ALL:x' to set a default for every block"
    )


def _consecutive_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """``[1, 2, 3, 7]`` → ``[(1, 3), (7, 7)]``."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def _span_text(first: str, last: str) -> str:
    """``'IN00-IN05'``, or the single id when the span has one block."""
    return first if first == last else f"{first}-{last}"


def _layout_ids(layout: str) -> tuple[str, ...]:
    """The layout's block ids; a WeightsError for an unknown layout."""
    try:
        return block_ids(layout)
    except ArchitectureError as error:
        raise WeightsError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUT_LABELS)}") from error


# --- preset files ----------------------------------------------------------


def load_presets(user_file: str | os.PathLike | None = None) -> dict[str, str]:
    """Shipped presets, then the user's file (default :func:`user_presets_path`) over them.

    Example:
        >>> load_presets()["ALL_B"].split(",")[:3]
        ['1', '1', '1']
    """
    path = pathlib.Path(user_file) if user_file is not None else user_presets_path()
    presets = dict(_shipped_presets())
    if path.is_file():
        presets.update(_read_preset_file(path))
    return presets


def user_presets_path() -> pathlib.Path:
    """``$SUPERMERGER_PRESETS`` if set, else ``~/.config/supermerger/mbw_presets.tsv``.

    Example:
        >>> user_presets_path().name
        'mbw_presets.tsv'
    """
    override = os.environ.get(USER_PRESETS_ENV)
    if override:
        return pathlib.Path(override).expanduser()
    return pathlib.Path.home() / ".config" / "supermerger" / "mbw_presets.tsv"


@functools.cache
def _shipped_presets() -> tuple[tuple[str, str], ...]:
    """The presets shipped in ``mergers/data`` (a tuple, so the cache stays immutable)."""
    resource = importlib.resources.files("mergers").joinpath(SHIPPED_PRESETS)
    with importlib.resources.as_file(resource) as path:
        return tuple(_read_preset_file(path).items())


def _read_preset_file(path: pathlib.Path) -> dict[str, str]:
    """``{name: values}`` from a preset file in the original's format."""
    try:
        # utf-8-sig: Windows editors often save a byte-order mark first.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise WeightsError(f"cannot read preset file {str(path)!r}: {error}") from error
    presets: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        entry = parse_preset_line(line, f"{path}:{number}")
        if entry is not None:
            presets[entry[0]] = entry[1]
    return presets


def parse_preset_line(line: str, where: str) -> tuple[str, str] | None:
    """``(name, values)`` from ``NAME<TAB>values`` or ``NAME:values``; None for a skip.

    Example:
        >>> parse_preset_line("MINE:0,1", "f.tsv:3")
        ('MINE', '0,1')
    """
    text = line.strip()
    if not text or text.startswith("#") or text.split("\t")[0].strip() == PRESET_HEADER:
        return None
    # A tab wins over ':' when a line has both, as in the original's reader.
    separator = "\t" if "\t" in text else ":"
    name, found, values = text.partition(separator)
    name, values = name.strip(), values.strip()
    if not found or not name or not values or "," in name:
        raise WeightsError(
            f"{where}: malformed preset line {text!r}; expected NAME<TAB>values "
            "or NAME:values (26 comma-separated numbers)"
        )
    return name, values
