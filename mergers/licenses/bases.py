"""The base model's license, told from the weights: a table (mergers/data/base_licenses.tsv) by family.

Flux [dev] and [schnell] have the same blocks; [dev] is guidance-distilled and carries the guidance
embedder (``guidance_in.*``), [schnell] does not. A family missing from the table has an unknown license.

Example:
    >>> base_license("sd1").license
    'CreativeML OpenRAIL-M'
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from mergers.licenses.terms import COMMERCIAL_USES

FLUX_GUIDANCE = "guidance_in."  # Flux [dev]'s guidance embedder, with or without "model.diffusion_model."
UNKNOWN_MARK = "?"


@dataclass(frozen=True)
class BaseLicense:
    """A base model's license: its name, the commercial uses it allows (None: unknown) and a note."""

    family: str
    license: str
    commercial: Optional[tuple[str, ...]]
    note: str = ""

    @property
    def use_restrictions(self) -> bool:
        """OpenRAIL licenses make every derivative carry their use restrictions on."""
        return "RAIL" in self.license


@functools.lru_cache(maxsize=1)
def base_licenses() -> dict[str, BaseLicense]:
    """The table: family (as detection names it; Flux split into flux_dev and flux_schnell) → license."""
    text = (resources.files("mergers") / "data" / "base_licenses.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return {family: BaseLicense(family, name, _uses(commercial), note.strip())
            for family, name, commercial, note in (row + [""] * (4 - len(row)) for row in rows)}


def _uses(text: str) -> Optional[tuple[str, ...]]:
    if text.strip() == UNKNOWN_MARK:
        return None
    named = {use.strip() for use in text.split(",") if use.strip()}
    return tuple(use for use in COMMERCIAL_USES if use in named)


def license_family(family: str, keys: Iterable[str]) -> str:
    """The family the license table knows: Flux as flux_dev or flux_schnell by its guidance embedder.

    Example:
        >>> license_family("flux", ["double_blocks.0.img_attn.qkv.weight"])
        'flux_schnell'
    """
    if family != "flux":
        return family
    return "flux_dev" if any(FLUX_GUIDANCE in key for key in keys) else "flux_schnell"


def base_license(family: str) -> Optional[BaseLicense]:
    """The license of ``family`` (after :func:`license_family`), or None when unknown."""
    return base_licenses().get(family)
