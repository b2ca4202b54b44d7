"""Tell a checkpoint's architecture from its key names and shapes alone (no tensor data is read).

The detection rules are data (``mergers/arch/data/layouts/*.json`` and the user's layout files), tried from
the highest priority down: key rules first, so scaled-down test models with real key names are recognised;
the U-Net's cross-attention width and structure are fallbacks for files that carry only
``model.diffusion_model.*``. Flux, SD3 and the newer DiTs are told by their transformer blocks, so files
holding only the diffusion model (bare ``double_blocks.0…`` keys included) are recognised too.

A file no rule recognises is not refused: it is ``unknown``, with an automatic block layout read from its
keys (:mod:`mergers.arch.auto`), and merges key by key like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergers.arch.auto import AUTO_PREFIX, auto_layout_name, key_summary
from mergers.arch.registry import arch_spec, registry, shipped_registry
from mergers.errors import ArchitectureError

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"
VARIANTS = ("normal", "inpainting", "instruct-pix2pix")
PREDICTIONS = ("eps", "v", "unknown")
INPUT_CONV_KEY = "model.diffusion_model.input_blocks.0.0.weight"
VARIANT_CHANNELS = {9: "inpainting", 8: "instruct-pix2pix"}  # 4 latent (+4 masked image +1 mask / +4 image)
PREDICTION_METADATA_KEY = "modelspec.prediction_type"
V_PRED_KEY = "v_pred"  # marker tensor A1111 and Forge read as "load with the v-prediction config"
# The shipped families and their labels, for messages that list them (LoRA tools, errors).
FAMILY_LABELS = {name: spec.label for name, spec in shipped_registry().architectures.items()}
FAMILY_LAYOUTS = {name: spec.layout for name, spec in shipped_registry().architectures.items()}
SUPPORTED_FAMILIES = tuple(FAMILY_LAYOUTS)


@dataclass(frozen=True)
class Architecture:
    """A model family with its input variant and prediction type.

    ``family`` "unknown" is a model no layout file describes: ``auto_layout`` is its automatic layout
    (``auto:…``) and ``summary`` says what its keys look like ("812 keys, prefix blocks., head.").
    """

    family: str
    variant: str = "normal"
    prediction: str = "eps"
    auto_layout: str = ""
    summary: str = ""

    def __post_init__(self) -> None:
        families = (*registry().architectures, UNKNOWN)
        for name, value, allowed in (("family", self.family, families), ("variant", self.variant, VARIANTS),
                                     ("prediction", self.prediction, PREDICTIONS)):
            if value not in allowed:
                raise ArchitectureError(f"unknown architecture {name} {value!r}; known: {', '.join(allowed)}")
        if self.family == UNKNOWN and not self.auto_layout.startswith(AUTO_PREFIX):
            raise ArchitectureError(f"an unknown architecture needs its automatic layout, got {self.auto_layout!r}")

    @property
    def layout(self) -> str:
        """The block layout name: "sdxl" for SDXL base; "sd1" for SD1, SD2 and the refiner; "flux", "qwen_image"…"""
        return self.auto_layout if self.family == UNKNOWN else arch_spec(self.family).layout

    @property
    def supported(self) -> bool:
        """Whether models of this family can be merged: always, unknown ones key by key."""
        return True

    @property
    def known(self) -> bool:
        """Whether a layout file describes this family (False: an automatic layout read from the keys)."""
        return self.family != UNKNOWN

    @property
    def label(self) -> str:
        """Human-readable name, e.g. "SD1.x inpainting", "SD2.x (v-prediction)" or "unknown (812 keys, prefix …)"."""
        if self.family == UNKNOWN:
            return f"unknown ({self.summary})" if self.summary else "unknown"
        variant = "" if self.variant == "normal" else f" {self.variant}"
        prediction = " (v-prediction)" if self.prediction == "v" else ""
        return f"{arch_spec(self.family).label}{variant}{prediction}"


def detect_architecture(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None, *,
                        source: str = "") -> Architecture:
    """The architecture of a checkpoint, from its key -> shape map and its safetensors metadata.

    A file no rule recognises is "unknown" with an automatic layout; ``source`` (a file name) is named in
    the error raised for a file without tensors.

    Example:
        >>> detect_architecture({"cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}).label
        'SD1.x'
    """
    if not shapes:
        raise ArchitectureError(f"{source or 'this model'}: holds no tensors, so its architecture cannot be recognised")
    family = detect_family(shapes)
    if family is None:
        arch = Architecture(UNKNOWN, "normal", "unknown", auto_layout_name(shapes), key_summary(list(shapes)))
    else:
        arch = Architecture(family, _variant(shapes), _prediction(family, shapes, metadata))
    logger.debug("%s: detected %s", source or "model", arch.label)
    return arch


def detect_family(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The first family (by rule priority) whose detection rule the keys satisfy, or None.

    Example:
        >>> detect_family({"double_blocks.0.img_attn.qkv.weight": (9, 3)})
        'flux'
    """
    for rule, spec in registry().detection_order:
        if rule.matches(shapes):
            return spec.name
    return None


def require_supported(arch: Architecture, *, source: str = "") -> None:
    """Kept for callers that gate on support: every architecture merges now, unknown ones key by key.

    Example:
        >>> require_supported(Architecture("flux", prediction="unknown"), source="flux1-dev.safetensors")
    """
    if not arch.supported:
        raise ArchitectureError(f"{source or 'this model'}: {arch.label} cannot be merged")


def lora_families() -> tuple[str, ...]:
    """The families the LoRA tools (apply, extract) know the module names of.

    Example:
        >>> "sdxl" in lora_families(), "qwen_image" in lora_families()
        (True, False)
    """
    return tuple(name for name, spec in registry().architectures.items() if spec.lora)


def require_lora_support(arch: Architecture, *, source: str = "") -> None:
    """Raise ArchitectureError naming ``source`` unless the LoRA tools know ``arch``'s module names.

    Example:
        >>> require_lora_support(Architecture("sdxl"), source="xl.safetensors")
    """
    if arch.known and arch_spec(arch.family).lora:
        return
    labels = ", ".join(dict.fromkeys(arch_spec(name).label for name in lora_families()))
    raise ArchitectureError(f"{source or 'this model'}: the LoRA tools support {labels}; {arch.label} is not one "
                            "of them (full checkpoints of it merge in the Merge tab)")


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
    return arch_spec(family).prediction
