"""Stand-in for modules/shared.py: the web UI's global objects.

``shared.sd_model`` is a property, as A1111 makes it (shared_items.Shared): reading
it returns ``sd_models.model_data.get_sd_model()``, which loads the selected
checkpoint the first time.
"""

import argparse
import os
import sys

import torch

from modules import options, paths, shared_state

cmd_opts = argparse.Namespace(
    data_dir=paths.data_path,
    ckpt=None,
    ckpt_dir=None,
    lora_dir=os.path.join(paths.models_path, "Lora"),
    ui_config_file=os.path.join(paths.data_path, "ui-config.json"),
    api=False,
    api_auth=None,
    nowebui=False,
    no_half=False,
    no_half_vae=False,
    lowvram=False,
    medvram=False,
    no_download_sd_model=True,
)

opts = options.Options({
    "sd_model_checkpoint": None,
    "sd_checkpoint_hash": "",
    "sd_checkpoint_cache": 0,
    "sd_checkpoints_limit": 1,
    "persistent_cond_cache": True,
    "outdir_samples": "",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_grids": "",
    "outdir_txt2img_grids": "outputs/txt2img-grids",
    "samples_save": False,
    "samples_format": "png",
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "CLIP_stop_at_last_layers": 1,
    "fp8_storage": "Disable",  # Settings → Optimizations: "Disable", "Enable for SDXL", "Enable"
    "cache_fp16_weight": False,  # "Cache FP16 weight for LoRA" (with FP8 storage)
})

state = shared_state.State()
device = torch.device("cpu")
weight_load_location = None
sd_model = None  # replaced by the property below


class Shared(sys.modules[__name__].__class__):
    """Makes ``sd_model`` load on demand, as A1111's shared_items.Shared does."""

    @property
    def sd_model(self):
        import modules.sd_models
        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models
        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
