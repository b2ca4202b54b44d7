"""Which block's ratio a key gets: the original SuperMerger's ``blockfromkey`` as rule tables.

Reproduces hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` l.1459–1528 (commit 0b1c491)
for every key of real SD1.x, SD2.x, SDXL and Flux checkpoints, so a shared weight string gives the same
ratio to the same key. ``None`` stands for the original's "Not Merge": the key keeps model A's value.
SD3 has no rule in the original; ours (``SD3_RULES``) follows the Flux one.
"""

from __future__ import annotations

import functools
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

# Flux (the original's Forge rule, l.1492): substrings first, then the transformer blocks, then "_in"
# (img_in, txt_in, time_in, vector_in, guidance_in) and final_layer. The VAE is never merged. Keys may be
# bare ("double_blocks.0…", as BFL ships them) or under "model.diffusion_model.".
FLUX_RULES: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(pattern), block) for pattern, block in (
        (r"vae", None),
        (r"t5xxl", "T5"),
        (r"text_encoders\.clip", "CLIP"),
        (r"double_blocks\.(\d+)\.", "D{n:02d}"),
        (r"single_blocks\.(\d+)\.", "S{n:02d}"),
        (r"_in", "IN"),
        (r"final_layer", "OUT"),
    )
)
# SD3 / SD3.5 (ComfyUI layout, or bare diffusion keys): text encoders, embedders, joint blocks, final layer.
# The VAE, like Flux's, is not merged; model_sampling's sigmas are a buffer.
SD3_RULES: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(pattern), block) for pattern, block in (
        (r"first_stage_model\.|model_sampling\.", None),
        (r"t5xxl", "T5"),
        (r"text_encoders\.clip_[lg]\.", "CLIP"),
        (r"joint_blocks\.(\d+)\.", "J{n:02d}"),
        (r"(^|\.)(x_embedder|context_embedder|t_embedder|y_embedder|pos_embed)\b", "IN"),
        (r"final_layer\.", "OUT"),
    )
)

_UNET_PART = re.compile(r"input|mid|output")
_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def block_of(key: str, layout: str) -> str | None:
    """The block id of ``layout`` whose ratio ``key`` gets, or None when it is never merged by block.

    ``layout`` is "sd1" (SD1.x, SD2.x, SDXL refiner), "sdxl", "flux", "sd3" or "sd3_large", as
    ``Architecture.layout`` gives.

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


def _rule_table_block(rules: tuple[tuple[re.Pattern[str], str | None], ...], layout: str, key: str) -> str | None:
    """The first matching rule's block; None for no match or a block number the layout lacks (D19, J24)."""
    for pattern, template in rules:
        match = pattern.search(key)
        if match:
            block = template.format(n=int(match.group(1))) if template and "{n" in template else template
            return block if block in LAYOUTS[layout] else None
    return None


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


_BLOCK_RULES: dict[str, Callable[[str], str | None]] = {
    "sd1": _sd1_block,
    "sdxl": _sdxl_block,
    "flux": functools.partial(_rule_table_block, FLUX_RULES, "flux"),
    "sd3": functools.partial(_rule_table_block, SD3_RULES, "sd3"),
    "sd3_large": functools.partial(_rule_table_block, SD3_RULES, "sd3_large"),
}

# Layouts whose text encoders and bare diffusion keys hold no "model" (T5's "encoder.block…",
# Flux's "double_blocks…"): the original merges every weight/bias key both models have (l.424).
NAME_NEEDS_MODEL = {"sd1": True, "sdxl": True, "flux": False, "sd3": False, "sd3_large": False}


def merges_by_name(key: str, layout: str) -> bool:
    """The original's name test for a key to merge: "weight" or "bias", and "model" for SD1/SDXL.

    Flux, SD3 and SD3.5 keys pass without "model", as the original's Flux branch lets them; which of
    them actually merge is then up to ``block_of`` (the VAE, for one, is None there).

    Example:
        >>> merges_by_name("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight", "flux")
        True
    """
    if layout not in NAME_NEEDS_MODEL:
        raise ArchitectureError(f"unknown layout {layout!r}; known: {', '.join(NAME_NEEDS_MODEL)}")
    if "weight" not in key and "bias" not in key:
        return False
    return "model" in key or not NAME_NEEDS_MODEL[layout]
