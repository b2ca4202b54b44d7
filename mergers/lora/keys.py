"""Which checkpoint key a LoRA module changes: kohya, LyCORIS and diffusers/PEFT names → LDM keys.

LoRA files name a module after the layer it trains, in one of several spellings:

- kohya sd-scripts / LyCORIS: ``lora_unet_<path>``, ``lora_te_<path>`` (SDXL: ``lora_te1_``, ``lora_te2_``),
  the path's dots turned into underscores. For SD1/SD2 the U-Net path is diffusers' (``down_blocks_0_...``),
  for SDXL it is the LDM one (``input_blocks_4_1_...``); both are accepted for every model. The text
  encoders are named as Hugging Face's CLIP (``text_model_encoder_layers_0_self_attn_q_proj``), also for
  OpenCLIP encoders (SD2, SDXL's second), whose q/k/v live stacked in one ``in_proj_weight``;
- diffusers / PEFT: ``unet.down_blocks.0....to_q`` and ``text_encoder[_2].text_model....``, with an optional
  ``base_model.model.`` prefix and the old attention-processor spelling ``attn1.processor.to_q_lora``.

The table is built from the checkpoint's own key list, so it fits the file at hand (e.g. SD1 text-encoder
keys with or without ``text_model.``). Facts from A1111's ``convert_diffusers_name_to_compvis`` and the
diffusers U-Net layout; the code is ours.

Example:
    >>> table = module_table(open_checkpoint("sd15.safetensors").shapes)
    >>> table["lora_unet_down_blocks_0_attentions_0_proj_in"].key
    'model.diffusion_model.input_blocks.1.1.proj_in.weight'
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from mergers.errors import ArchitectureError

UNET = "model.diffusion_model."
# A Hugging Face CLIP text encoder inside a checkpoint (SD1, SDXL's first): its kohya name prefix.
CLIP_ENCODERS = (
    (re.compile(r"^cond_stage_model\.transformer\.(?:text_model\.)?(.+)$"), ("lora_te_",)),
    (re.compile(r"^conditioner\.embedders\.0\.transformer\.(?:text_model\.)?(.+)$"), ("lora_te1_", "lora_te_")),
)
# An OpenCLIP text encoder (SD2, SDXL's second): stored in OpenCLIP's names, trained in Hugging Face's.
OPENCLIP_ENCODERS = (
    (re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.(.+)$"), ("lora_te_",)),
    (re.compile(r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(.+)$"), ("lora_te2_",)),
)
OPENCLIP_TO_HF = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                  "mlp.c_proj.weight": "mlp.fc2"}
IN_PROJ = "attn.in_proj_weight"
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # row thirds of in_proj_weight, in order

# LDM resnet sub-layers → diffusers ResnetBlock2D names.
RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# LDM U-Net layers outside the blocks → diffusers names.
UNET_SINGLES = {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
                "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
LAYERS_PER_LEVEL = 3  # two resnet(+attention) layers and a down/upsampler per U-Net level, SD1 and SDXL alike

# diffusers/PEFT prefixes → kohya's; the longest first, so text_encoder_2 is not read as text_encoder.
DOTTED_PREFIXES = (("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te_"), ("unet.", "lora_unet_"))
PEFT_WRAPPER = "base_model.model."
PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")  # diffusers' old attention processors


@dataclass(frozen=True)
class Target:
    """The checkpoint tensor a LoRA module changes; ``part`` is q/k/v's third of a stacked in_proj (0–2)."""

    key: str
    shape: tuple[int, ...]
    part: int | None = None

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape of the change: the tensor's, or one third of its rows for a q/k/v part."""
        if self.part is None:
            return self.shape
        return (self.shape[0] // len(QKV), *self.shape[1:])


def module_table(shapes: Mapping[str, Sequence[int]]) -> dict[str, Target]:
    """Every kohya-style module name a LoRA may use for this checkpoint → the tensor it changes.

    ``shapes`` is a checkpoint's key → shape map (``Checkpoint.shapes`` or a key list's).

    Example:
        >>> module_table({"model.diffusion_model.out.2.weight": (4, 320, 3, 3)})["lora_unet_conv_out"].key
        'model.diffusion_model.out.2.weight'
    """
    table: dict[str, Target] = {}
    for key, shape in shapes.items():
        if len(shape) < 2:
            continue  # norms, biases and scalars: no LoRA type we read changes them
        for name, part in lora_names(key):
            target = Target(key, tuple(shape), part)
            if table.setdefault(name, target) != target:
                raise ArchitectureError(f"LoRA module {name} would change both {table[name].key} and {key}")
    return table


def lora_names(key: str) -> Iterator[tuple[str, int | None]]:
    """The kohya-style module names that address checkpoint ``key``, each with its in_proj third.

    Example:
        >>> list(lora_names("model.diffusion_model.input_blocks.1.0.in_layers.2.weight"))
        [('lora_unet_input_blocks_1_0_in_layers_2', None), ('lora_unet_down_blocks_0_resnets_0_conv1', None)]
    """
    if key.startswith(UNET) and key.endswith(".weight"):
        path = key[len(UNET):-len(".weight")]
        yield "lora_unet_" + _underscored(path), None
        diffusers = diffusers_unet_path(path)
        if diffusers is not None:
            yield "lora_unet_" + _underscored(diffusers), None
        return
    yield from _text_encoder_names(key)


def diffusers_unet_path(path: str) -> str | None:
    """The diffusers U-Net name of an LDM U-Net layer path (no ``.weight``), or None if it has none.

    Example:
        >>> diffusers_unet_path("output_blocks.2.1.conv")
        'up_blocks.0.upsamplers.0.conv'
    """
    if path in UNET_SINGLES:
        return UNET_SINGLES[path]
    middle = re.match(r"^middle_block\.(\d+)\.(.+)$", path)
    if middle:
        return _middle_path(int(middle.group(1)), middle.group(2))
    block = re.match(r"^(input|output)_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if block is None:
        return None
    side, number, layer, rest = block.group(1), int(block.group(2)), int(block.group(3)), block.group(4)
    return _input_path(number, layer, rest) if side == "input" else _output_path(number, layer, rest)


def _input_path(block: int, layer: int, rest: str) -> str | None:
    level, position = divmod(block - 1, LAYERS_PER_LEVEL)
    if position == LAYERS_PER_LEVEL - 1:
        return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
    if layer == 0:
        return f"down_blocks.{level}.resnets.{position}.{_resnet_name(rest)}"
    return f"down_blocks.{level}.attentions.{position}.{rest}"


def _middle_path(layer: int, rest: str) -> str:
    """middle_block.0 and .2 are resnets 0 and 1, middle_block.1 the attention."""
    if layer == 1:
        return f"mid_block.attentions.0.{rest}"
    return f"mid_block.resnets.{layer // 2}.{_resnet_name(rest)}"


def _output_path(block: int, layer: int, rest: str) -> str:
    level, position = divmod(block, LAYERS_PER_LEVEL)
    if layer == 0:
        return f"up_blocks.{level}.resnets.{position}.{_resnet_name(rest)}"
    if rest == "conv":  # an Upsample's only layer: output_blocks.2.1.conv (SD1) or .2.2.conv (with attention)
        return f"up_blocks.{level}.upsamplers.0.conv"
    return f"up_blocks.{level}.attentions.{position}.{rest}"


def _resnet_name(rest: str) -> str:
    for ldm, diffusers in RESNET_NAMES.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm):]
    return rest


def _text_encoder_names(key: str) -> Iterator[tuple[str, int | None]]:
    for pattern, prefixes in CLIP_ENCODERS:
        match = pattern.match(key)
        if match and key.endswith(".weight"):
            for prefix in prefixes:
                yield prefix + "text_model_" + _underscored(match.group(1)[:-len(".weight")]), None
            return
    for pattern, prefixes in OPENCLIP_ENCODERS:
        match = pattern.match(key)
        if match:
            yield from _openclip_names(prefixes[0], match.group(1), match.group(2))
            return


def _openclip_names(prefix: str, layer: str, rest: str) -> Iterator[tuple[str, int | None]]:
    stem = f"{prefix}text_model_encoder_layers_{layer}_"
    if rest == IN_PROJ:
        for part, name in enumerate(QKV):
            yield stem + _underscored(name), part
    elif rest in OPENCLIP_TO_HF:
        yield stem + _underscored(OPENCLIP_TO_HF[rest]), None


def canonical_module_name(name: str) -> str:
    """A LoRA file's module name in kohya's spelling (diffusers/PEFT names are converted).

    Example:
        >>> canonical_module_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora")
        'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0'
    """
    if name.startswith(PEFT_WRAPPER):
        name = name[len(PEFT_WRAPPER):]
    name = PROCESSOR.sub(lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out" else ""), name)
    for dotted, kohya in DOTTED_PREFIXES:
        if name.startswith(dotted):
            return kohya + _underscored(name[len(dotted):])
    return name


def _underscored(path: str) -> str:
    return path.replace(".", "_")
