"""Tell a checkpoint's architecture from its key names and shapes alone (no tensor data is read).

Key rules come first, so scaled-down test models with real key names are recognised; the U-Net's
cross-attention width and structure are fallbacks for files that carry only ``model.diffusion_model.*``.
Flux and SD3 are told by their transformer blocks, so files holding only the diffusion model (Flux's
bare ``double_blocks.0…`` keys included) are recognised too; SD3.5 Large by its 38 joint blocks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergers.errors import ArchitectureError

logger = logging.getLogger(__name__)

# family -> block layout ("sd1" covers SD2 and the refiner: the original gives all three 26 blocks).
FAMILY_LAYOUTS = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sdxl_refiner": "sd1", "sd3": "sd3",
                  "sd35_large": "sd3_large", "flux": "flux"}
FAMILY_LABELS = {
    "sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner", "sd3": "SD3",
    "sd35_large": "SD3.5 Large", "flux": "Flux",
}
SUPPORTED_FAMILIES = tuple(FAMILY_LAYOUTS)
VARIANTS = ("normal", "inpainting", "instruct-pix2pix")
PREDICTIONS = ("eps", "v", "unknown")

# (family, pattern searched in each key): the first family with a matching key wins.
KEY_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (family, re.compile(pattern))
    for family, pattern in (
        ("flux", r"double_blocks"),
        ("sd3", r"joint_blocks"),
        # The original's SDXL test, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.weight"
        # in keys, is one case of this: OpenCLIP bigG as the second text encoder.
        ("sdxl", r"^conditioner\.embedders\.1\.model\.transformer\."),
        ("sdxl_refiner", r"^conditioner\.embedders\.0\.model\.transformer\."),  # bigG only, no CLIP-L
        ("sdxl", r"^conditioner\.embedders\.0\.transformer\."),  # CLIP-L
        ("sd2", r"^cond_stage_model\.model\.transformer\."),  # OpenCLIP ViT-H
        ("sd1", r"^cond_stage_model\.transformer\."),  # CLIP-L, with or without "text_model."
    )
)

UNET_PREFIX = "model.diffusion_model."
# Cross-attention context width (attn2.to_k.weight shape[1]) of the real models.
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
SDXL_BASE_LAST_INPUT_BLOCK = 8  # channel_mult (1, 2, 4): 9 input blocks; the refiner's 4 levels give 12
SD3_MEDIUM_JOINT_BLOCKS = 24  # SD3 Medium and SD3.5 Medium; SD3.5 Large has 38
JOINT_BLOCK = re.compile(r"joint_blocks\.(\d+)\.")
INPUT_BLOCK = re.compile(r"\.input_blocks\.(\d+)\.")

INPUT_CONV_KEY = "model.diffusion_model.input_blocks.0.0.weight"
VARIANT_CHANNELS = {9: "inpainting", 8: "instruct-pix2pix"}  # 4 latent (+4 masked image +1 mask / +4 image)

PREDICTION_METADATA_KEY = "modelspec.prediction_type"
V_PRED_KEY = "v_pred"  # marker tensor A1111 and Forge read as "load with the v-prediction config"
# SD2 eps and v models have the same weights (A1111 runs the model to tell them apart).
# SD3 and Flux are flow-matching models: neither eps nor v.
DEFAULT_PREDICTION = {"sd1": "eps", "sd2": "unknown", "sdxl": "eps", "sdxl_refiner": "eps", "sd3": "unknown",
                      "sd35_large": "unknown", "flux": "unknown"}

SAMPLE_KEYS_IN_ERRORS = 3


@dataclass(frozen=True)
class Architecture:
    """A model family with its input variant and prediction type."""

    family: str
    variant: str = "normal"
    prediction: str = "eps"

    def __post_init__(self) -> None:
        for name, value, allowed in (("family", self.family, tuple(FAMILY_LAYOUTS)),
                                     ("variant", self.variant, VARIANTS),
                                     ("prediction", self.prediction, PREDICTIONS)):
            if value not in allowed:
                raise ArchitectureError(f"unknown architecture {name} {value!r}; known: {', '.join(allowed)}")

    @property
    def layout(self) -> str:
        """The block layout name: "sdxl" for SDXL base; "sd1" for SD1, SD2 and the refiner; "flux", "sd3", "sd3_large"."""
        return FAMILY_LAYOUTS[self.family]

    @property
    def supported(self) -> bool:
        """Whether models of this family can be merged (every family detection knows, SD3 and Flux included)."""
        return self.family in SUPPORTED_FAMILIES

    @property
    def label(self) -> str:
        """Human-readable name, e.g. "SD1.x inpainting" or "SD2.x (v-prediction)"."""
        variant = "" if self.variant == "normal" else f" {self.variant}"
        prediction = " (v-prediction)" if self.prediction == "v" else ""
        return f"{FAMILY_LABELS[self.family]}{variant}{prediction}"


def detect_architecture(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None, *,
                        source: str = "") -> Architecture:
    """The architecture of a checkpoint, from its key -> shape map and its safetensors metadata.

    ``source`` (a file name) is named in the error raised when no known layout matches.

    Example:
        >>> detect_architecture({"cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}).label
        'SD1.x'
    """
    family = _family_from_keys(shapes) or _family_from_unet(shapes)
    if family is None:
        raise ArchitectureError(_unknown_message(shapes, source))
    arch = Architecture(family, _variant(shapes), _prediction(family, shapes, metadata))
    logger.debug("%s: detected %s", source or "model", arch.label)
    return arch


def require_supported(arch: Architecture, *, source: str = "") -> None:
    """Raise ArchitectureError naming ``source`` unless models of ``arch`` can be merged.

    Every family detection recognises is supported today; this stays the one gate for a family that
    detection learns before merging does.

    Example:
        >>> require_supported(Architecture("flux", prediction="unknown"), source="flux1-dev.safetensors")
    """
    if not arch.supported:
        supported = ", ".join(FAMILY_LABELS[family] for family in SUPPORTED_FAMILIES)
        raise ArchitectureError(
            f"{source or 'this model'}: {arch.label} is recognised but not supported yet (supported: {supported})"
        )


def _family_from_keys(shapes: Mapping[str, Sequence[int]]) -> str | None:
    for family, pattern in KEY_RULES:
        if any(pattern.search(key) for key in shapes):
            return _sd3_size(shapes) if family == "sd3" else family
    return None


def _sd3_size(shapes: Mapping[str, Sequence[int]]) -> str:
    """"sd35_large" past the 24 joint blocks of SD3 Medium / SD3.5 Medium, else "sd3"."""
    blocks = [int(match.group(1)) for key in shapes if (match := JOINT_BLOCK.search(key))]
    return "sd35_large" if max(blocks) >= SD3_MEDIUM_JOINT_BLOCKS else "sd3"


def _family_from_unet(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """U-Net-only files: the real models' cross-attention width, else the U-Net's structure."""
    widths = {shape[1] for key, shape in shapes.items()
              if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight") and len(shape) == 2}
    families = {CONTEXT_DIMS[width] for width in widths if width in CONTEXT_DIMS}
    if len(families) == 1 and len(widths) == 1:
        return families.pop()
    return _family_from_unet_structure(shapes)


def _family_from_unet_structure(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Scaled-down U-Nets: SDXL has label_emb (base: 9 input blocks, refiner: 12); SD2 has linear proj_in."""
    unet = [key for key in shapes if key.startswith(UNET_PREFIX)]
    input_blocks = [int(match.group(1)) for key in unet if (match := INPUT_BLOCK.search(key))]
    if not input_blocks:
        return None
    if any(key.startswith(UNET_PREFIX + "label_emb.") for key in unet):
        return "sdxl" if max(input_blocks) <= SDXL_BASE_LAST_INPUT_BLOCK else "sdxl_refiner"
    proj_in = next((shapes[key] for key in unet if key.endswith(".proj_in.weight")), None)
    if proj_in is None:
        return None
    return "sd2" if len(proj_in) == 2 else "sd1"  # SD1 projects with a 1x1 conv (4-D weight)


def _variant(shapes: Mapping[str, Sequence[int]]) -> str:
    shape = shapes.get(INPUT_CONV_KEY)
    if shape is None or len(shape) < 2:
        return "normal"
    return VARIANT_CHANNELS.get(int(shape[1]), "normal")


def _prediction(family: str, shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None) -> str:
    declared = str((metadata or {}).get(PREDICTION_METADATA_KEY, "")).lower()
    if V_PRED_KEY in shapes or "v" in declared:  # "v", "v_prediction", "v-prediction"
        return "v"
    if "eps" in declared:  # "epsilon", "eps"
        return "eps"
    return DEFAULT_PREDICTION[family]


def _unknown_message(shapes: Mapping[str, Sequence[int]], source: str) -> str:
    name = source or "this model"
    if not shapes:
        return f"{name}: holds no tensors, so its architecture cannot be recognised"
    sample = ", ".join(repr(key) for key in list(shapes)[:SAMPLE_KEYS_IN_ERRORS])
    return (f"{name}: unknown model architecture: no SD1.x, SD2.x, SDXL, SD3 or Flux keys "
            f"({len(shapes)} keys, starting with {sample})")
