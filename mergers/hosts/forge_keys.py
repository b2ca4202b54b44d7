"""Checkpoint keys → the live tensors of a model loaded by Forge / Forge Neo (pure data and functions).

Forge 2 converts a checkpoint while it loads (huggingface_guess ``transformers_convert``,
``SDXL.process_clip_state_dict``): the U-Net, text encoders and VAE become three modules, each
under its own patcher (``forge_objects.unet.model``, ``.clip.patcher.model``, ``.vae.patcher.model``),
and OpenCLIP text encoders (SDXL's CLIP-G, SD2's CLIP-H) take Hugging Face names. This module says,
for one checkpoint key, which part holds it, under which live name(s), and how the checkpoint
tensor becomes the live one. Facts from ``shared/forge-notes.md`` (checked in Forge @ dfdcbab).

Example:
    >>> forge_target("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight").names
    ('clip_g.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight', ..k_proj.., ..v_proj..)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

UNET, CLIP, VAE = "unet", "clip", "vae"

COPY = "copy"  # the live tensor is the checkpoint tensor
SPLIT = "split"  # OpenCLIP's fused in_proj: rows split in three equal parts, q, k, v
TRANSPOSE = "transpose"  # OpenCLIP's text_projection (x @ P) is a Linear's weight (P.T) in Hugging Face


@dataclass(frozen=True)
class LiveTarget:
    """Where one checkpoint key lives in Forge's model: a part, one or more live names, a transform."""

    part: str  # UNET, CLIP or VAE: which patcher's ``.model`` the names are under
    names: tuple[str, ...]
    transform: str = COPY


# Checkpoint prefix → (part, live prefix); the first match wins, so longer prefixes come first.
PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("model.diffusion_model.", UNET, "diffusion_model."),
    ("first_stage_model.", VAE, ""),
    ("vae.", VAE, ""),  # Flux / SD3 single files
    ("cond_stage_model.transformer.text_model.", CLIP, "clip_l.transformer.text_model."),
    ("cond_stage_model.transformer.", CLIP, "clip_l.transformer.text_model."),  # old SD1 files lack text_model.
    ("conditioner.embedders.0.transformer.text_model.", CLIP, "clip_l.transformer.text_model."),
    ("text_encoders.clip_l.", CLIP, "clip_l."),
    ("text_encoders.clip_g.", CLIP, "clip_g."),
    ("text_encoders.t5xxl.", CLIP, "t5xxl."),
)

# A Flux transformer saved alone (as Black Forest Labs ship it) has its keys bare.
BARE_FLUX_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
                   "guidance_in.", "final_layer.")

# OpenCLIP text encoders in SGM / LDM checkpoints → the Hugging Face CLIP that Forge builds.
OPEN_CLIP_PREFIXES = {
    "conditioner.embedders.1.model.": "clip_g",  # SDXL
    "cond_stage_model.model.": "clip_h",  # SD2
}
OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# One resblock's parts → one Hugging Face encoder layer's (under text_model.encoder.layers.N.).
OPEN_CLIP_LAYER_PARTS = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}
OPEN_CLIP_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
QKV = ("q_proj", "k_proj", "v_proj")
# Keys outside the resblocks: checkpoint rest → (live name under the encoder, transform).
OPEN_CLIP_OTHERS = {
    "positional_embedding": ("transformer.text_model.embeddings.position_embedding.weight", COPY),
    "token_embedding.weight": ("transformer.text_model.embeddings.token_embedding.weight", COPY),
    "ln_final.weight": ("transformer.text_model.final_layer_norm.weight", COPY),
    "ln_final.bias": ("transformer.text_model.final_layer_norm.bias", COPY),
    "text_projection": ("transformer.text_projection.weight", TRANSPOSE),
    "logit_scale": ("logit_scale", COPY),
}

# Not model weights in Forge's objects: EMA copies, scheduler buffers and prediction-type markers
# (bare names, edm_vpred.*, SD3's sampling sigmas; Forge reads them to pick a predictor), token position ids.
SKIPPED_PREFIXES = ("model_ema.", "edm_vpred.", "model.model_sampling.")
SKIPPED_SUFFIXES = ("position_ids",)


def skipped(key: str) -> bool:
    """Keys a checkpoint carries that Forge does not load as weights (so nothing to write or restore).

    Example:
        >>> skipped("alphas_cumprod"), skipped("model_ema.decay"), skipped("model.diffusion_model.out.2.bias")
        (True, True, False)
    """
    return "." not in key or key.startswith(SKIPPED_PREFIXES) or key.endswith(SKIPPED_SUFFIXES)


def forge_target(key: str) -> Optional[LiveTarget]:
    """The live target of a checkpoint key, or None for keys Forge does not load (``skipped``) or we do not know.

    Example:
        >>> forge_target("model.diffusion_model.out.2.weight")
        LiveTarget(part='unet', names=('diffusion_model.out.2.weight',), transform='copy')
        >>> forge_target("conditioner.embedders.1.model.text_projection").transform
        'transpose'
    """
    if skipped(key):
        return None
    for prefix, encoder in OPEN_CLIP_PREFIXES.items():
        if key.startswith(prefix):
            return _open_clip(key[len(prefix):], encoder)
    for prefix, part, live in PREFIXES:
        if key.startswith(prefix):
            return LiveTarget(part, (live + key[len(prefix):],))
    if key.startswith(BARE_FLUX_ROOTS):
        return LiveTarget(UNET, ("diffusion_model." + key,))
    return None


def _open_clip(rest: str, encoder: str) -> Optional[LiveTarget]:
    """An OpenCLIP key (after its model prefix) → the Hugging Face names under ``encoder``."""
    other = OPEN_CLIP_OTHERS.get(rest)
    if other is not None:
        name, transform = other
        return LiveTarget(CLIP, (f"{encoder}.{name}",), transform)
    match = OPEN_CLIP_LAYER.fullmatch(rest)
    if match is None:
        return None
    number, inner = match.groups()
    layer = f"{encoder}.transformer.text_model.encoder.layers.{number}."
    if inner in OPEN_CLIP_IN_PROJ:
        kind = OPEN_CLIP_IN_PROJ[inner]
        return LiveTarget(CLIP, tuple(f"{layer}self_attn.{proj}.{kind}" for proj in QKV), SPLIT)
    for old, new in OPEN_CLIP_LAYER_PARTS.items():
        if inner.startswith(old):
            return LiveTarget(CLIP, (layer + new + inner[len(old):],))
    return None
