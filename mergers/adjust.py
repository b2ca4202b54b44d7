"""Adjust: nudge detail, contrast, brightness and colour through six U-Net keys.

The original SuperMerger's "Adjust" box (``fineman``/``colorcalc``) holds eight
comma-separated numbers ``IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3``. After merging,
it scales the first input convolution and the last output layers, and shifts
the bias of the final convolution, whose four channels are the latent's::

    input_blocks.0.0.weight × (1 − IN·0.01)     input_blocks.0.0.bias × (1 + IN·0.02)
    out.0.weight            × (1 − OUT·0.01)    out.0.bias            × (1 + OUT·0.02)
    out.2.weight            × (1 − OUT2·0.01)   out.2.bias            + [CONT·0.02, c1, c2, c3]

where ``c = Σ 0.02·v·COLOURS[v]`` over v = BRI, COL1, COL2, COL3, with the colour
table of the layout: SD1 and SDXL latents encode colour differently.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergers.errors import ArchitectureError, WeightsError
from mergers.weights import format_number

# The original's FINETUNES, in its order; the same names in SD1, SD2 and SDXL checkpoints.
ADJUST_KEYS: tuple[str, ...] = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.bias",
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.0.bias",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.out.2.bias",
)
ADJUST_FIELDS = ("IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3")

# Latent-channel (1..3) shift per unit of BRI, COL1 (cyan-red), COL2 (magenta-green),
# COL3 (yellow-blue): the original's COLS and COLSXL.
COLOUR_TABLES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sd1": ((-1, 1 / 3, 2 / 3), (1, 1, 0), (0, -1, -1), (1, 0, 1)),
    "sdxl": ((0, 0, 1), (1, 0, 0), (-1, -1, 0), (-1, 1, 0)),
}


@dataclass(frozen=True)
class Adjust:
    """The eight Adjust values ``IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3``.

    Example:
        >>> Adjust((1, 0, 0, 0, 0, 0, 0, 0)).as_text()
        '1,0,0,0,0,0,0,0'
    """

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.values)
        if len(values) != len(ADJUST_FIELDS):
            raise WeightsError(
                f"adjust needs {len(ADJUST_FIELDS)} values ({','.join(ADJUST_FIELDS)}); got {len(values)}"
            )
        for field, value in zip(ADJUST_FIELDS, values):
            if not math.isfinite(value):
                raise WeightsError(f"adjust {field} ({value!r}) is not a finite number")
        # Frozen: the coerced tuple must go in through object.__setattr__.
        object.__setattr__(self, "values", values)

    def as_text(self) -> str:
        """The comma list the original's Adjust box takes.

        Example:
            >>> Adjust((0, 0, 0, 0, 1.5, 0, 0, 0)).as_text()
            '0,0,0,0,1.5,0,0,0'
        """
        return ",".join(format_number(v) for v in self.values)


def parse_adjust(text: str | Sequence[float] | Adjust | None) -> Adjust | None:
    """Read the Adjust box: up to 8 numbers, missing ones 0; None when empty or all zero (off).

    Example:
        >>> parse_adjust("2, 0, 1").values
        (2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    """
    if text is None:
        return None
    if isinstance(text, Adjust):
        values = text.values
    elif isinstance(text, str):
        values = _parse_numbers(text)
    else:
        values = [_number(v, field) for v, field in zip(_check_count(list(text)), ADJUST_FIELDS)]
    padded = tuple(values) + (0.0,) * (len(ADJUST_FIELDS) - len(values))
    return Adjust(padded) if any(padded) else None


def adjust_for_key(adjust: Adjust, key: str, layout: str) -> Callable[[Tensor], Tensor] | None:
    """The change Adjust makes to ``key`` as a pure tensor function, or None if ``key`` is not adjusted.

    Example:
        >>> adjust_for_key(Adjust((10, 0, 0, 0, 0, 0, 0, 0)), ADJUST_KEYS[0], "sd1")(torch.ones(1))
        tensor([0.9000])
    """
    changes = key_changes(adjust, layout)
    return changes.get(key)


def key_changes(adjust: Adjust, layout: str) -> dict[str, Callable[[Tensor], Tensor]]:
    """Every adjusted key with its tensor function (the original's ``fineman``).

    Example:
        >>> sorted(key_changes(Adjust((1,) + (0,) * 7), "sd1")) == sorted(ADJUST_KEYS)
        True
    """
    detail_in, detail_out, detail_out2, contrast = adjust.values[:4]
    # The multipliers are Python floats, as in the original: a tensor times a float keeps its dtype.
    factors = (
        1 - detail_in * 0.01,
        1 + detail_in * 0.02,
        1 - detail_out * 0.01,
        1 + detail_out * 0.02,
        1 - detail_out2 * 0.01,
    )
    offsets = (contrast * 0.02, *colour_offsets(adjust.values[4:], layout))
    changes: dict[str, Callable[[Tensor], Tensor]] = {
        key: functools.partial(_scale, factor=factor) for key, factor in zip(ADJUST_KEYS, factors)
    }
    changes[ADJUST_KEYS[5]] = functools.partial(_shift, offsets=offsets)
    return changes


def colour_offsets(colours: Sequence[float], layout: str) -> tuple[float, float, float]:
    """Shift of latent channels 1..3 for BRI, COL1, COL2, COL3 (the original's ``colorcalc``).

    Example:
        >>> colour_offsets((0, 1, 0, 0), "sdxl")
        (0.02, 0.0, 0.0)
    """
    table = COLOUR_TABLES.get(layout)
    if table is None:
        raise ArchitectureError(f"no Adjust colour table for the {layout!r} layout; known: {', '.join(COLOUR_TABLES)}")
    # Same operation order as the original (unit·value·0.02, summed from 0), so the float64 sums match.
    per_colour = [[unit * value * 0.02 for unit in row] for row, value in zip(table, colours)]
    first, second, third = (sum(channel) for channel in zip(*per_colour))
    return first, second, third


def _scale(tensor: Tensor, *, factor: float) -> Tensor:
    """``tensor × factor`` in the tensor's dtype."""
    return tensor * factor


def _shift(tensor: Tensor, *, offsets: tuple[float, ...]) -> Tensor:
    """``tensor + offsets``; the offsets are float32 as the original's ``torch.tensor(list)``, so fp16 promotes."""
    return tensor + torch.tensor(offsets, dtype=torch.float32, device=tensor.device)


def _parse_numbers(text: str) -> list[float]:
    """Comma-separated numbers; blank entries (``1,,2``) are 0 and trailing commas are ignored."""
    trimmed = re.sub(r"[\s,]+$", "", text)
    if not trimmed.strip():
        return []
    tokens = _check_count(trimmed.split(","))
    return [_number(token.strip() or 0, field) for token, field in zip(tokens, ADJUST_FIELDS)]


def _check_count(values: list) -> list:
    """``values`` unless there are more than eight."""
    if len(values) > len(ADJUST_FIELDS):
        raise WeightsError(
            f"adjust takes at most {len(ADJUST_FIELDS)} values ({','.join(ADJUST_FIELDS)}); got {len(values)}"
        )
    return values


def _number(value: object, field: str) -> float:
    """One finite adjust value; the error names the field."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WeightsError(f"adjust {field} ({value!r}) is not a number") from None
    if not math.isfinite(number):
        raise WeightsError(f"adjust {field} ({value!r}) is not a finite number")
    return number
