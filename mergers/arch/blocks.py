"""Which block's ratio a key gets: the original SuperMerger's ``blockfromkey`` as rule tables.

Reproduces hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` l.1459–1528 (commit 0b1c491)
for every key of real SD1.x, SD2.x and SDXL checkpoints, so a shared weight string gives the same
ratio to the same key. ``None`` stands for the original's "Not Merge": the key keeps model A's value.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mergers.arch.layouts import LAYOUTS
from mergers.errors import ArchitectureError

# SD1.x, SD2.x and the SDXL refiner: the first matching rule wins; "{n}" is the captured block number.
# Everything that matches no rule (text encoder, VAE, EMA, schedule buffers) is BASE.
SD1_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"time_embed"), "IN00"),
    (re.compile(r"\.out\."), "OUT11"),  # model.diffusion_model.out.0 / out.2, after the last output block
    (re.compile(r"\.input_blocks\.(\d+)\."), "IN{n:02d}"),
    (re.compile(r"\.middle_block\.(\d+)\."), "M00"),
    (re.compile(r"\.output_blocks\.(\d+)\."), "OUT{n:02d}"),
)

# SDXL: substrings tested in order, each giving (fine block, block). U-Net keys that match none of
# them are named from their digits (see _sdxl_unet_blocks).
SDXL_RULES: tuple[tuple[str, str, str], ...] = (
    ("label_emb", "LABEL", "IN00"),
    ("time_embed", "TIME", "IN00"),
    ("conditioner.embedders.0.", "CLIPL", "BASE"),
    ("conditioner.embedders.1.", "CLIPG", "BASE"),
    ("first_stage_model", "VAE", "BASE"),
    ("model.diffusion_model.out.", "OUT9", "OUT08"),
)
SDXL_UNET = "model.diffusion_model"

# The 110 fine SDXL blocks of "extended XL" weights and elemental merges, in the original's order
# (BLOCKIDXLLL). Each name is <part><block#><sub-module#>[<transformer block#>]; "IN0" is never produced.
SDXL_FINE_BLOCKS: tuple[str, ...] = (
    ("CLIPL", "CLIPG", "IN0", "IN00", "IN10", "IN20", "IN30", "IN40", "IN41", "IN410", "IN411")
    + ("IN50", "IN51", "IN510", "IN511", "IN60", "IN70", "IN71")
    + tuple(f"IN71{t}" for t in range(10))
    + ("IN80", "IN81")
    + tuple(f"IN81{t}" for t in range(10))
    + ("MID00", "MID10")
    + tuple(f"MID10{t}" for t in range(10))
    + ("MID20", "OUT00", "OUT01")
    + tuple(f"OUT01{t}" for t in range(10))
    + ("OUT10", "OUT11")
    + tuple(f"OUT11{t}" for t in range(10))
    + ("OUT20", "OUT21")
    + tuple(f"OUT21{t}" for t in range(10))
    + ("OUT22", "OUT30", "OUT31", "OUT310", "OUT311", "OUT40", "OUT41", "OUT410", "OUT411")
    + ("OUT50", "OUT51", "OUT510", "OUT511", "OUT52", "OUT60", "OUT70", "OUT80", "OUT9", "TIME", "LABEL", "VAE")
)

_UNET_PART = re.compile(r"input|mid|output")
_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def block_of(key: str, layout: str) -> str | None:
    """The block id of ``layout`` whose ratio ``key`` gets, or None when it is never merged by block.

    ``layout`` is "sd1" (SD1.x, SD2.x, SDXL refiner) or "sdxl", as ``Architecture.layout`` gives.

    Example:
        >>> block_of("model.diffusion_model.output_blocks.5.1.proj_in.weight", "sd1")
        'OUT05'
    """
    rule = _BLOCK_RULES.get(layout)
    if rule is None:
        raise ArchitectureError(f"no block weights for the {layout!r} layout; known: {', '.join(_BLOCK_RULES)}")
    return rule(key)


def fine_block_of_sdxl(key: str) -> str | None:
    """The original's fine SDXL block name of ``key`` (one of ``SDXL_FINE_BLOCKS``), or None if never merged.

    Used by "extended XL" (110-value) weights and elemental merges.

    Example:
        >>> fine_block_of_sdxl("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight")
        'IN411'
    """
    blocks = _sdxl_blocks(key)
    return blocks[0] if blocks is not None and blocks[1] in LAYOUTS["sdxl"] else None


def _sd1_block(key: str) -> str | None:
    for pattern, template in SD1_RULES:
        match = pattern.search(key)
        if match:
            block = template.format(n=int(match.group(1))) if match.groups() else template
            # Block numbers past 11 are in no real file; the original would misfile or crash on them.
            return block if block in LAYOUTS["sd1"] else None
    return "BASE"


def _sdxl_block(key: str) -> str | None:
    blocks = _sdxl_blocks(key)
    # The original skips any block that is not one of its 20 (BLOCKIDXLL), e.g. "IN09".
    return blocks[1] if blocks is not None and blocks[1] in LAYOUTS["sdxl"] else None


def _sdxl_blocks(key: str) -> tuple[str, str] | None:
    """(fine block, block) as the original names them, before it checks that the block exists."""
    if "weight" not in key and "bias" not in key:
        return None
    for part, fine, block in SDXL_RULES:
        if part in key:
            return fine, block
    return _sdxl_unet_blocks(key) if SDXL_UNET in key else None


def _sdxl_unet_blocks(key: str) -> tuple[str, str] | None:
    """Names from the key's digits: the first is the block number, the next the sub-module number.

    The middle block has one sub-module level, so its fine name is MID<sub-module>0.
    """
    found = _UNET_PART.search(key)
    part = found.group(0).upper().replace("PUT", "") if found else ""
    digits = re.sub(r"\D", "", key)
    if not digits:
        return None  # the original returns a bare "M00" here, which its caller cannot unpack
    transformer = _TRANSFORMER_BLOCK.search(key) if "transformer" in key else None
    suffix = transformer.group(1) if transformer else ""
    if part == "MID":
        return f"MID{digits[0]}0{suffix}", "M00"
    return f"{part}{digits[:2]}{suffix}", f"{part}0{digits[0]}"


_BLOCK_RULES: dict[str, Callable[[str], str | None]] = {"sd1": _sd1_block, "sdxl": _sdxl_block}
