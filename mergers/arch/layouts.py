"""Block layouts: the ordered block ids that a weight string's values map onto.

The SD1/SDXL names and orders are the original SuperMerger's (``BLOCKID`` and
``BLOCKIDXLL`` without its trailing, unused VAE slot), so a shared weight
string means the same thing here. Flux's 61 ids are the original's
``BLOCKIDFLUX`` (its Forge support): CLIP, T5, IN, D00–D18 (double blocks),
S00–S37 (single blocks), OUT. The original has no SD3 layout; ours follows
Flux's pattern: CLIP (CLIP-L and CLIP-G), T5, IN, one Jnn per joint block, OUT
(28 ids for SD3 Medium / SD3.5 Medium, 42 for SD3.5 Large).

Example:
    >>> len(block_ids("flux")), block_ids("flux")[:4]
    (61, ('CLIP', 'T5', 'IN', 'D00'))
"""

SD1_BLOCKS = (
    ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(12))
    + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(12))
)
SDXL_BLOCKS = (
    ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(9))
    + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(9))
)
# Flux dev/schnell: 19 double-stream and 38 single-stream transformer blocks.
FLUX_BLOCKS = ("CLIP", "T5", "IN") + tuple(f"D{i:02d}" for i in range(19)) + tuple(f"S{i:02d}" for i in range(38)) + ("OUT",)
# SD3 Medium and SD3.5 Medium have 24 joint (MMDiT) blocks; SD3.5 Large has 38.
SD3_BLOCKS = ("CLIP", "T5", "IN") + tuple(f"J{i:02d}" for i in range(24)) + ("OUT",)
SD3_LARGE_BLOCKS = ("CLIP", "T5", "IN") + tuple(f"J{i:02d}" for i in range(38)) + ("OUT",)

# "sd1" serves SD1.x, SD2.x and the SDXL refiner (the original maps all three by
# the 26-block rule: the refiner has 12 input and 12 output blocks).
LAYOUTS = {"sd1": SD1_BLOCKS, "sdxl": SDXL_BLOCKS, "flux": FLUX_BLOCKS, "sd3": SD3_BLOCKS,
           "sd3_large": SD3_LARGE_BLOCKS}


def block_ids(layout: str) -> tuple[str, ...]:
    """The block ids of ``layout`` in weight-string order.

    Example:
        >>> block_ids("sdxl")[:3]
        ('BASE', 'IN00', 'IN01')
    """
    return LAYOUTS[layout]
