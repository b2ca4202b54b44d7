"""Block layouts: the ordered block ids that a weight string's values map onto.

The layouts are data (``mergers/arch/data/layouts/*.json``, plus the user's files; see
:mod:`mergers.arch.registry`). The SD1/SDXL names and orders are the original SuperMerger's (``BLOCKID`` and
``BLOCKIDXLL`` without its trailing, unused VAE slot), so a shared weight string means the same thing here.
Flux's 61 ids are the original's ``BLOCKIDFLUX`` (its Forge support): CLIP, T5, IN, D00–D18 (double blocks),
S00–S37 (single blocks), OUT. The original has no SD3 layout; ours follows Flux's pattern: CLIP (CLIP-L and
CLIP-G), T5, IN, one Jnn per joint block, OUT (28 ids for SD3 Medium / SD3.5 Medium, 42 for SD3.5 Large).
A model no file describes gets an automatic layout (``auto:…``, see :mod:`mergers.arch.auto`).

Example:
    >>> len(block_ids("flux")), block_ids("flux")[:4]
    (61, ('CLIP', 'T5', 'IN', 'D00'))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from mergers.arch.registry import layout_named, registry, shipped_registry
from mergers.errors import ArchitectureError


def block_ids(layout: str) -> tuple[str, ...]:
    """The block ids of ``layout`` in weight-string order.

    Example:
        >>> block_ids("sdxl")[:3]
        ('BASE', 'IN00', 'IN01')
    """
    return layout_named(layout).blocks


class _LayoutIds(Mapping):
    """``LAYOUTS[name]``: the block ids of every known layout (automatic ``auto:…`` names included)."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        try:
            return block_ids(name)
        except ArchitectureError as error:
            raise KeyError(name) from error

    def __iter__(self) -> Iterator[str]:
        return iter(registry().layouts)

    def __len__(self) -> int:
        return len(registry().layouts)


LAYOUTS: Mapping[str, tuple[str, ...]] = _LayoutIds()
# The original's layouts as shipped (a user file may redefine them; block_ids reads that).
SD1_BLOCKS = shipped_registry().layouts["sd1"].blocks
SDXL_BLOCKS = shipped_registry().layouts["sdxl"].blocks
FLUX_BLOCKS = shipped_registry().layouts["flux"].blocks
SD3_BLOCKS = shipped_registry().layouts["sd3"].blocks
SD3_LARGE_BLOCKS = shipped_registry().layouts["sd3_large"].blocks
