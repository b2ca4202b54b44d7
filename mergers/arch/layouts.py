"""Block layouts: the ordered block ids that a weight string's values map onto.

The names and orders are the original SuperMerger's (``BLOCKID`` and
``BLOCKIDXLL`` without its trailing, unused VAE slot), so a shared weight
string means the same thing here.
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

# "sd1" serves SD1.x, SD2.x and the SDXL refiner (the original maps all three by
# the 26-block rule: the refiner has 12 input and 12 output blocks).
LAYOUTS = {"sd1": SD1_BLOCKS, "sdxl": SDXL_BLOCKS}


def block_ids(layout: str) -> tuple[str, ...]:
    """The block ids of ``layout`` in weight-string order.

    Example:
        >>> block_ids("sdxl")[:3]
        ('BASE', 'IN00', 'IN01')
    """
    return LAYOUTS[layout]
