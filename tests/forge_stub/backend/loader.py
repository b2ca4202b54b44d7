"""Stand-in for backend/loader.py: ``forge_loader``, a checkpoint file → a ``ForgeDiffusionEngine``.

Like Forge's, it guesses the family, splits the state dict into U-Net, VAE and text encoders, converts
the text encoders to Hugging Face names (huggingface_guess ``transformers_convert`` and
``SDXL.process_clip_state_dict``: OpenCLIP resblocks → encoder layers, ``in_proj`` split into q/k/v,
``text_projection`` transposed, SD1's ``text_model.`` added), builds the modules and loads the weights
in their storage dtypes, all under ``torch.inference_mode()``. Files in ``additional_state_dicts``
(a VAE, a CLIP-L or T5 text encoder) replace the checkpoint's part.
"""

import safetensors.torch
import torch

from backend import memory_management, operations_bnb, operations_gguf
from backend.args import dynamic_args
from backend.diffusion_engine.base import Flux, ForgeObjects, StableDiffusion, StableDiffusionXL
from backend.patcher.clip import CLIP
from backend.patcher.unet import KModel, UnetPatcher
from backend.patcher.vae import VAE

FLUX_TEST_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
SDXL_TEST_KEY = "conditioner.embedders.1.model.positional_embedding"
ENGINES = {"sd1": StableDiffusion, "sdxl": StableDiffusionXL, "flux": Flux}
UNET_PREFIXES = ("model.diffusion_model.",)
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Where each family keeps a CLIP-L / T5 text encoder (for files loaded beside the checkpoint).
CLIP_L_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer.",
                 "flux": "text_encoders.clip_l.transformer."}
T5_PREFIX = "text_encoders.t5xxl.transformer."
RESBLOCK_PARTS = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                  ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")]
LOGIT_SCALE = 4.6055  # IntegratedCLIP's initial value, kept when a file has none


def load_torch_file(path):
    return safetensors.torch.load_file(str(path), device="cpu")


def guess_family(sd):
    if any(key.endswith(FLUX_TEST_KEY) for key in sd):
        return "flux"
    return "sdxl" if SDXL_TEST_KEY in sd else "sd1"


def replace_state_dict(sd, asd, family):
    """A VAE or text encoder loaded from its own file replaces the checkpoint's."""
    if "decoder.conv_in.weight" in asd:
        prefix = "vae." if family == "flux" else "first_stage_model."
        for key in [k for k in sd if k.startswith(prefix)]:
            del sd[key]
        sd.update({prefix + k: v for k, v in asd.items()})
    elif any(k.startswith("encoder.block.") for k in asd):
        sd.update({T5_PREFIX + k: v for k, v in asd.items()})
    elif "text_model.encoder.layers.0.layer_norm1.bias" in asd:
        sd.update({CLIP_L_PREFIX[family] + k: v for k, v in asd.items()})
    return sd


def transformers_convert(sd, prefix_from, prefix_to, number):
    """OpenCLIP text transformer → Hugging Face CLIPTextModel names, layer by layer."""
    renames = {"positional_embedding": "embeddings.position_embedding.weight",
               "token_embedding.weight": "embeddings.token_embedding.weight",
               "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    for old, new in renames.items():
        if prefix_from + old in sd:
            sd[prefix_to + new] = sd.pop(prefix_from + old)
    for layer in range(number):
        block = f"{prefix_from}transformer.resblocks.{layer}."
        target = f"{prefix_to}encoder.layers.{layer}."
        for old, new in RESBLOCK_PARTS:
            for kind in ("weight", "bias"):
                if f"{block}{old}.{kind}" in sd:
                    sd[f"{target}{new}.{kind}"] = sd.pop(f"{block}{old}.{kind}")
        for kind in ("weight", "bias"):
            fused = sd.pop(f"{block}attn.in_proj_{kind}", None)
            if fused is None:
                continue
            rows = fused.shape[0] // 3
            for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                sd[f"{target}self_attn.{proj}.{kind}"] = fused[rows * index:rows * (index + 1)]
    return sd


def clip_state_dict(sd, family):
    """The text encoders' tensors under JointTextEncoder's names (clip_l., clip_g., t5xxl.)."""
    out = {}
    if family == "sd1":
        prefix = "cond_stage_model.transformer."
        for key, value in sd.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                rest = rest if rest.startswith("text_model.") else "text_model." + rest
                out["clip_l.transformer." + rest] = value
    elif family == "sdxl":
        prefix_l, prefix_g = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
        out.update({"clip_l.transformer." + k[len(prefix_l):]: v for k, v in sd.items() if k.startswith(prefix_l)})
        g = {k: v for k, v in sd.items() if k.startswith(prefix_g)}
        layers = 1 + max(int(k[len(prefix_g):].split(".")[2]) for k in g if ".resblocks." in k)
        g = transformers_convert(g, prefix_g, "clip_g.transformer.text_model.", layers)
        if prefix_g + "text_projection" in g:
            g["clip_g.transformer.text_projection.weight"] = g.pop(prefix_g + "text_projection").transpose(0, 1)
        if prefix_g + "logit_scale" in g:
            g["clip_g.logit_scale"] = g.pop(prefix_g + "logit_scale")
        out.update({k: v for k, v in g.items() if k.startswith("clip_g.")})
    else:
        for prefix, name in (("text_encoders.clip_l.", "clip_l."), ("text_encoders.t5xxl.", "t5xxl.")):
            out.update({name + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    for encoder in ("clip_l", "clip_g"):
        if any(k.startswith(encoder + ".") for k in out):
            out.setdefault(f"{encoder}.logit_scale", torch.tensor(LOGIT_SCALE))
    return out


def split_state_dict(sd, additional_state_dicts=None):
    sd = load_torch_file(sd)
    family = guess_family(sd)
    for path in additional_state_dicts or []:
        sd = replace_state_dict(sd, load_torch_file(path), family)
    unet = {}
    for key, value in sd.items():
        if key.startswith(UNET_PREFIXES):
            unet["diffusion_model." + key[len(UNET_PREFIXES[0]):]] = value
        elif family == "flux" and key.split(".")[0] in ("double_blocks", "single_blocks", "img_in", "txt_in",
                                                        "time_in", "vector_in", "guidance_in", "final_layer"):
            unet["diffusion_model." + key] = value
    vae = {}
    for prefix in VAE_PREFIXES:
        vae.update({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return {"unet": unet, "vae": vae, "clip": clip_state_dict(sd, family)}, family


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    """backend/text_processing/classic_engine.py: wraps the token embedding; ``.weight`` is ``.wrapped.weight``."""

    def __init__(self, wrapped, embeddings=None, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight


def build_module(state, dtype, pack=None):
    """A module tree whose parameter names are ``state``'s keys, holding the values in ``dtype``
    (a quantized storage packs 2-D weights)."""
    root = torch.nn.Module()
    for key, value in state.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        if not value.is_floating_point():
            module.register_buffer(name, value.clone())
        elif pack is not None and value.dim() == 2 and name == "weight":
            module.register_parameter(name, pack(value))
        else:
            module.register_parameter(name, torch.nn.Parameter(value.to(dtype).clone(), requires_grad=False))
    return root


def _unet_storage():
    storage = dynamic_args.get("forge_unet_storage_dtype")
    if storage is None:
        return memory_management.unet_dtype(), None
    if storage in ("nf4", "fp4"):
        return storage, lambda w: operations_bnb.pack(w, storage)
    if storage == "gguf":
        return storage, operations_gguf.pack
    return storage, None


@torch.inference_mode()
def forge_loader(sd, additional_state_dicts=None):
    state_dicts, family = split_state_dict(sd, additional_state_dicts)
    storage, pack = _unet_storage()
    unet = build_module(state_dicts["unet"], storage if pack is None else torch.float16, pack).diffusion_model
    clip_root = build_module(state_dicts["clip"], memory_management.text_encoder_dtype())
    for name, encoder in clip_root.named_children():
        if name in ("clip_l", "clip_g"):
            embeddings = encoder.transformer.text_model.embeddings
            embeddings.token_embedding = CLIPEmbeddingForTextualInversion(embeddings.token_embedding,
                                                                          textual_inversion_key=name)
    vae = build_module(state_dicts["vae"], memory_management.vae_dtype())
    engine = ENGINES[family](estimated_config=family, huggingface_components={})
    objects = ForgeObjects(UnetPatcher.from_model(KModel(unet, storage)), CLIP(dict(clip_root.named_children())),
                           VAE(vae), None)
    engine.forge_objects = objects
    engine.forge_objects_original = objects.shallow_copy()
    engine.forge_objects_after_applying_lora = objects.shallow_copy()
    engine.is_sd1, engine.is_sdxl = family == "sd1", family == "sdxl"
    return engine
