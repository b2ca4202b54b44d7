"""Which block's ratio a key gets: the original SuperMerger's ``blockfromkey`` as rules in data files.

The rules live with the layouts (``mergers/arch/data/layouts/*.json``). For SD1.x, SD2.x, SDXL and Flux they
reproduce hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` l.1459–1528 (commit 0b1c491) for
every key of the real checkpoints, so a shared weight string gives the same ratio to the same key. ``None``
stands for the original's "Not Merge": the key keeps model A's value. SD3 has no rule in the original; ours
follows the Flux one. The other models' rules (Qwen-Image, HiDream, Wan…) are ours.
"""

from __future__ import annotations

from mergers.arch.registry import layout_named, shipped_registry
from mergers.errors import ArchitectureError

# The 110 fine SDXL blocks of "extended XL" weights and elemental merges, in the original's order
# (BLOCKIDXLLL). Each name is <part><block#><sub-module#>[<transformer block#>]; "IN0" is never produced.
SDXL_FINE_BLOCKS: tuple[str, ...] = shipped_registry().layouts["sdxl"].fine_blocks


def block_of(key: str, layout: str) -> str | None:
    """The block id of ``layout`` whose ratio ``key`` gets, or None when it is never merged by block.

    ``layout`` is a layout name as ``Architecture.layout`` gives: "sd1" (SD1.x, SD2.x, SDXL refiner), "sdxl",
    "flux", "sd3", "sd3_large", "qwen_image"…, a user layout, or an automatic ``auto:…`` one.

    Example:
        >>> block_of("model.diffusion_model.output_blocks.5.1.proj_in.weight", "sd1")
        'OUT05'
    """
    try:
        found = layout_named(layout)
    except ArchitectureError as error:
        raise ArchitectureError(f"no block weights for the {layout!r} layout: {error}") from error
    return found.block_of(key)


def fine_block_of(key: str, layout: str) -> str | None:
    """The fine block name of ``key`` in ``layout`` (SDXL's 110), or None when the layout has none.

    Example:
        >>> fine_block_of("model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight", "sdxl")
        'MID103'
    """
    return layout_named(layout).fine_block_of(key)


def fine_block_of_sdxl(key: str) -> str | None:
    """The original's fine SDXL block name of ``key`` (one of ``SDXL_FINE_BLOCKS``), or None if never merged.

    Used by "extended XL" (110-value) weights and elemental merges.

    Example:
        >>> fine_block_of_sdxl("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight")
        'IN411'
    """
    return fine_block_of(key, "sdxl")


def merges_by_name(key: str, layout: str) -> bool:
    """The original's name test for a key to merge: "weight" or "bias", and "model" for SD1/SDXL.

    Flux and SD3 keys pass without "model", as the original's Flux branch lets them; layouts the original
    never had (Qwen-Image, automatic ones…) merge every key, norm scales and embeddings included. Which of
    them actually merge is then up to ``block_of`` (the VAE, for one, is None there).

    Example:
        >>> merges_by_name("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight", "flux")
        True
    """
    try:
        found = layout_named(layout)
    except ArchitectureError as error:
        raise ArchitectureError(f"unknown layout {layout!r}: {error}") from error
    if found.name_needs_weight and "weight" not in key and "bias" not in key:
        return False
    return "model" in key or not found.name_needs_model
