"""Stand-in for Forge's modules/processing.py: txt2img through Forge's model objects.

As Forge: ``forge_model_reload()`` before each batch; ``forge_objects`` reset to the originals, the
extra networks (LoRAs) activated, then ``forge_objects_after_applying_lora`` used; the text encoder,
U-Net and VAE patchers are loaded (``memory_management.load_model(s)_gpu``, which applies their LoRAs
when they were not loaded); the conditioning caches have three entries and are keyed on the prompt
and checkpoint, not on the weights. The image's pixels come from a checksum of the weights the
"sampler" sees: the U-Net and VAE directly, the text encoder through the (cached) conditioning.
"""

import hashlib
import importlib.util
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from modules import shared, sd_models

# Processed and the infotext are A1111's, unchanged in Forge.
_spec = importlib.util.spec_from_file_location(
    "modules._a1111_processing", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                              "a1111_stub", "modules", "processing.py"))
_a1111 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_a1111)
Processed = _a1111.Processed
create_infotext = _a1111.create_infotext

processed_log = []  # not in Forge: every p that process_images ran


@dataclass(repr=False)
class StableDiffusionProcessing(_a1111.StableDiffusionProcessing):
    distilled_cfg_scale: float = 3.5

    cached_uc = [None, None, None]
    cached_c = [None, None, None]

    def __post_init__(self):
        super().__post_init__()
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def close(self):
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def get_conds_with_caching(self, function, required_prompts, cache):
        # Forge's cached_params: the prompts, the checkpoint and the extra networks (LoRAs), never the weights.
        networks = sys.modules.get("networks")
        extra = tuple(networks.selected) if networks is not None else ()
        cached_params = (tuple(required_prompts), shared.sd_model.sd_checkpoint_info, extra)
        if cache[0] is not None and cache[0] == cached_params:
            return cache[1]
        cache[1] = function(shared.sd_model, required_prompts)
        cache[2] = {}
        cache[0] = cached_params
        return cache[1]


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing, _a1111.StableDiffusionProcessingTxt2Img):
    cached_hr_uc = [None, None, None]
    cached_hr_c = [None, None, None]

    def __post_init__(self):
        StableDiffusionProcessing.__post_init__(self)
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c


def _digest(module, prefix=""):
    digest = hashlib.sha256()
    for name, tensor in module.state_dict(keep_vars=True).items():
        digest.update((prefix + name).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _conditioning(sd_model, prompts):
    """get_learned_conditioning: loads the text encoder's patcher (applying its LoRAs) and reads its weights."""
    from backend import memory_management
    clip = sd_model.forge_objects.clip
    memory_management.load_model_gpu(clip.patcher)
    return _digest(clip.cond_stage_model)


def _sample(p, seed, conditioning):
    from backend import memory_management
    objects = p.sd_model.forge_objects
    memory_management.load_models_gpu([objects.unet])
    memory_management.load_model_gpu(objects.vae.patcher)
    rest = _digest(objects.unet.model) + _digest(objects.vae.first_stage_model)
    text = "\n".join([conditioning, rest, p.prompt, p.negative_prompt, str(seed), str(p.steps), str(p.cfg_scale)])
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))
    return Image.fromarray(rng.integers(0, 256, size=(p.height, p.width, 3), dtype=np.uint8))


def process_images(p):
    processed_log.append((p, shared.state.job))
    seed = p.seed if p.seed not in (-1, None) else int(random.randrange(4294967294))
    p.all_prompts = [p.prompt] * p.batch_size
    p.all_negative_prompts = [p.negative_prompt] * p.batch_size
    p.all_seeds = [seed + i for i in range(p.batch_size)]
    p.all_subseeds = [-1] * p.batch_size
    sd_model, _ = sd_models.forge_model_reload()
    p.sd_model_name = sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = sd_model.sd_model_hash
    sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
    networks = sys.modules.get("networks")
    if networks is not None:
        networks.load_networks(list(networks.selected))
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    conditioning = p.get_conds_with_caching(_conditioning, p.all_prompts, p.cached_c)
    images = [_sample(p, s, conditioning) for s in p.all_seeds]
    infotexts = [create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=i) for i in range(len(images))]
    return Processed(p, images, seed, infotexts[0], all_seeds=p.all_seeds, infotexts=infotexts)
