"""LoRA entries ``name:ratio[:blocks]`` and the ratio each checkpoint key gets from them.

``blocks`` is a LoRA block-weight preset (``mergers/lora/data/lbw_presets.tsv``, then the Merge tab's
26-value presets such as ``GRAD_V``) or numbers: 17 (SD1: BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,
OUT03–OUT11, the lora-block-weight extension's layout), 12 (SDXL: BASE,IN04,IN05,IN07,IN08,M00,
OUT00–OUT05), 20 (SDXL's blocks) or 26 (SD1's). As the original's ``to26``, a shorter list is spread
over the 26 blocks and the blocks it does not name get 0. Each value is multiplied by the entry's ratio
(the original does that for presets but drops the ratio for inline numbers; here both multiply).

Example:
    >>> entry = parse_entry("style.safetensors:0.8:OUTALL")
    >>> entry.ratio_of("OUT05"), entry.ratio_of("IN01")
    (0.8, 0.0)
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mergers.arch import SD1_BLOCKS, block_of
from mergers.errors import WeightsError
from mergers.weights import finite_float, load_presets, parse_number, parse_preset_line

# The block lists shorter weight strings name, in their order (the original's BLOCKID12/17/20).
SHORT_LAYOUTS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6)),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12)),
    20: ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9)),
    26: SD1_BLOCKS,
}
SHIPPED_LBW_PRESETS = "data/lbw_presets.tsv"
# name[:ratio[:blocks]]; the name is as short as it can be, so "C:/x.safetensors:0.5" keeps its drive.
ENTRY = re.compile(r"^(?P<name>.+?)(?::(?P<ratio>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?::(?P<blocks>.*))?)?$")


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA to use: its name or path, ratio, and block weights (None: the ratio everywhere)."""

    name: str
    ratio: float = 1.0
    blocks: str | None = None
    block_values: Mapping[str, float] | None = field(default=None, compare=False)  # 26 blocks, ratio applied

    def ratio_of(self, block: str | None) -> float:
        """The ratio for a key of ``block`` (None, as for SDXL keys outside the blocks: BASE's)."""
        if self.block_values is None:
            return self.ratio
        return self.block_values.get(block or "BASE", self.block_values["BASE"])

    def ratio_for_key(self, key: str, layout: str) -> float:
        """The ratio for checkpoint ``key`` of a model with block ``layout`` ("sd1" or "sdxl")."""
        return self.ratio_of(block_of(key, layout))

    def as_text(self) -> str:
        """The entry as typed: ``name:ratio[:blocks]``."""
        return f"{self.name}:{self.ratio:g}" + (f":{self.blocks}" if self.blocks else "")


def parse_entry(text: str, *, presets: Mapping[str, str] | None = None) -> LoraEntry:
    """``name[:ratio[:blocks]]`` → a LoraEntry with its block weights resolved.

    Example:
        >>> parse_entry("C:/loras/x.safetensors:0.5").ratio
        0.5
    """
    match = ENTRY.match(text.strip())
    if match is None or not match.group("name").strip():
        raise WeightsError(f"{text!r}: expected name:ratio[:blocks], e.g. style.safetensors:0.8:OUTALL")
    ratio = float(match.group("ratio")) if match.group("ratio") is not None else 1.0
    blocks = (match.group("blocks") or "").strip() or None
    values = block_values(blocks, ratio, presets=presets, where=match.group("name")) if blocks else None
    return LoraEntry(match.group("name").strip(), ratio, blocks, values)


def parse_entries(text: str, *, presets: Mapping[str, str] | None = None) -> list[LoraEntry]:
    """Several entries separated by commas or new lines (a block list's commas stay with its entry).

    Example:
        >>> [e.name for e in parse_entries("a:1:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, b:0.5")]
        ['a', 'b']
    """
    pieces: list[str] = []
    for piece in re.split(r"[,\n]", text):
        if not piece.strip():
            continue
        if pieces and _continues_block_list(pieces[-1], piece):
            pieces[-1] += "," + piece.strip()
        else:
            pieces.append(piece.strip())
    return [parse_entry(piece, presets=presets) for piece in pieces]


def _continues_block_list(previous: str, piece: str) -> bool:
    """A bare number after an entry with inline blocks (``name:ratio:v1``) is that list's next value."""
    match = ENTRY.match(previous)
    return bool(match and match.group("blocks")) and finite_float(piece) is not None


def block_values(blocks: str, ratio: float, *, presets: Mapping[str, str] | None = None,
                 where: str = "") -> dict[str, float]:
    """The 26 blocks' ratios for a block string (preset name or numbers), times ``ratio``.

    Example:
        >>> block_values("INS", 2.0)["IN02"], block_values("INS", 2.0)["IN03"]
        (2.0, 0.0)
    """
    text = blocks.strip()
    if "," not in text:
        table = lbw_presets() if presets is None else presets
        found = table.get(text) or table.get(text.upper())
        if found is None:
            raise WeightsError(f"{where}: unknown LoRA block preset {text!r}; known: {', '.join(sorted(table))}")
        text = found
    values = [parse_number(token, f"{where}: block value {n}") for n, token in enumerate(text.split(","), 1)]
    return spread_to_26(values, where=where, scale=ratio)


def spread_to_26(values: Sequence[float], *, where: str = "", scale: float = 1.0) -> dict[str, float]:
    """12, 17, 20 or 26 values → the 26 blocks (unnamed blocks 0), as the original's ``to26``.

    Example:
        >>> spread_to_26([1] * 17)["IN00"]
        0.0
    """
    ids = SHORT_LAYOUTS.get(len(values))
    if ids is None:
        raise WeightsError(f"{where}: {len(values)} block values; LoRA block weights take 12, 17, 20 or 26")
    spread = dict.fromkeys(SD1_BLOCKS, 0.0)
    spread.update({block: value * scale for block, value in zip(ids, values)})
    return spread


def lbw_presets() -> dict[str, str]:
    """LoRA block-weight presets: the Merge tab's (26 values) under the LoRA ones (17), which win."""
    return {**load_presets(), **dict(_shipped_lbw_presets())}


@functools.cache
def _shipped_lbw_presets() -> tuple[tuple[str, str], ...]:
    resource = importlib.resources.files("mergers.lora").joinpath(SHIPPED_LBW_PRESETS)
    lines = resource.read_text(encoding="utf-8").splitlines()
    return tuple(entry for n, line in enumerate(lines, 1)
                 if (entry := parse_preset_line(line, f"{SHIPPED_LBW_PRESETS}:{n}")) is not None)
