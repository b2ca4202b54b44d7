"""Stand-in for modules/processing.py: txt2img parameters and ``process_images``.

The "sampler" draws an image whose pixels come from a checksum of the loaded
model's weights, the prompt and the seed: a merge visibly changes the image, the
same weights and settings give the same image. Before "sampling", the built-in
Lora extension's weight patching runs on every module, as A1111's patched
``forward`` methods do.
"""

import hashlib
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from modules import infotext_utils, shared

processed_log = []  # not in A1111: every p that process_images ran, with shared.state.job at the time


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    overlay_images: list = None
    eta: float = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float = 0
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False

    cached_uc = [None, None]
    cached_c = [None, None]

    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    sd_model_name: str = field(default=None, init=False)
    sd_model_hash: str = field(default=None, init=False)

    def __post_init__(self):
        self.styles = self.styles or []
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        # Every instance shares the class's cache lists until the class attributes are rebound.
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    @property
    def sd_model(self):  # noqa: F811 - A1111 declares the field, then overrides it with this property
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    def close(self):
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def get_conds_with_caching(self, function, required_prompts, cache):
        """A1111's cache: keyed on the prompt and the checkpoint info, never on the weights."""
        cached_params = (tuple(required_prompts), shared.sd_model.sd_checkpoint_info)
        if cache[0] is not None and cache[0] == cached_params:
            return cache[1]
        cache[1] = function(shared.sd_model, required_prompts)
        cache[0] = cached_params
        return cache[1]


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str = None

    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    def __post_init__(self):
        super().__post_init__()
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.info = info
        self.comments = comments
        self.width = p.width
        self.height = p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [-1]
        self.infotexts = infotexts or [info] * len(images_list)

    def infotext(self, p, index):
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_subseeds, comments=[],
                               position_in_batch=index % self.batch_size, iteration=index // self.batch_size)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """``prompt``, ``Negative prompt: …`` and ``Key: value, …`` with ``extra_generation_params`` last but Version."""
    if index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    opts = shared.opts
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "CFG scale": p.cfg_scale,
        "Seed": all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash if opts.add_model_hash_to_info else None,
        "Model": p.sd_model_name if opts.add_model_name_to_info else None,
        **p.extra_generation_params,
        "Version": "v1.10.1" if opts.add_version_to_infotext else None,
    }
    text = ", ".join(k if k == v else f"{k}: {infotext_utils.quote(v)}" for k, v in generation_params.items() if v is not None)
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = all_negative_prompts[index]
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_prompt_text}\n{text}".strip()


def _apply_networks(sd_model):
    """A1111 patches Linear/Conv2d/… forward to apply the selected LoRAs first; do that for each module."""
    networks = sys.modules.get("networks")
    if networks is None:
        return
    with torch.no_grad():
        for module in sd_model.modules():
            networks.network_apply_weights(module)


def _conditioning(sd_model, prompts):
    """The text encoder's share of the picture: its weights' checksum (stand-in for get_learned_conditioning)."""
    return _weights_digest(sd_model, "cond_stage_model.")


def _weights_digest(sd_model, prefix="", exclude=None):
    digest = hashlib.sha256()
    for name, tensor in sd_model.state_dict(keep_vars=True).items():
        if name.startswith(prefix) and not (exclude and name.startswith(exclude)):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sample(p, seed, conditioning):
    """An image from the weights: the U-Net and VAE directly, the text encoder only through the cached conditioning."""
    rest = _weights_digest(p.sd_model, exclude="cond_stage_model.")
    text = "\n".join([conditioning, rest, p.prompt, p.negative_prompt, str(seed), str(p.steps), str(p.cfg_scale)])
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))
    return Image.fromarray(rng.integers(0, 256, size=(p.height, p.width, 3), dtype=np.uint8))


def process_images(p):
    """Generate ``p.batch_size`` images with the loaded model; the infotexts include extra_generation_params."""
    processed_log.append((p, shared.state.job))
    seed = p.seed if p.seed not in (-1, None) else int(random.randrange(4294967294))
    p.all_prompts = [p.prompt] * p.batch_size
    p.all_negative_prompts = [p.negative_prompt] * p.batch_size
    p.all_seeds = [seed + i for i in range(p.batch_size)]
    p.all_subseeds = [-1] * p.batch_size
    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    _apply_networks(p.sd_model)
    conditioning = p.get_conds_with_caching(_conditioning, p.all_prompts, p.cached_c)
    images = [_sample(p, s, conditioning) for s in p.all_seeds]
    infotexts = [create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=i) for i in range(len(images))]
    return Processed(p, images, seed, infotexts[0], all_seeds=p.all_seeds, infotexts=infotexts)
