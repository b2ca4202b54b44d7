"""Stand-in for Forge's modules/sd_models.py: the checkpoint list (A1111's) and Forge's model loading.

Forge loads lazily: ``model_data.forge_loading_parameters`` (checkpoint, additional modules, U-Net storage
dtype) says what should be loaded, and ``forge_model_reload()`` (run before every batch) rebuilds the
model only when they changed since the last load (``forge_hash``), then runs ``on_model_loaded``.
"""

import importlib.util
import os

from modules import hashes, paths, script_callbacks, shared  # noqa: F401  (hashes: as A1111's module does)

# A1111's checkpoint list, unchanged in Forge: the A1111 stand-in's functions and tables.
_spec = importlib.util.spec_from_file_location(
    "modules._a1111_sd_models", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                             "a1111_stub", "modules", "sd_models.py"))
_a1111 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_a1111)
CheckpointInfo = _a1111.CheckpointInfo
checkpoints_list = _a1111.checkpoints_list
checkpoint_aliases = _a1111.checkpoint_aliases
list_models = _a1111.list_models
get_closet_checkpoint_match = _a1111.get_closet_checkpoint_match
select_checkpoint = _a1111.select_checkpoint
checkpoint_tiles = _a1111.checkpoint_tiles
model_path = _a1111.model_path

# Forge's settings (modules_forge/main_entry.py's options), on A1111's.
shared.opts.data_labels.setdefault("forge_additional_modules", [])
shared.opts.data_labels.setdefault("forge_unet_storage_dtype", "Automatic")


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v


model_data = SdModelData()


def model_target(checkpoint_info=None, additional_modules=(), unet_storage_dtype=None):
    """Not in Forge (its UI's checkpoint/module/dtype pickers set these): what the next reload loads."""
    model_data.forge_loading_parameters = dict(checkpoint_info=checkpoint_info or select_checkpoint(),
                                               additional_modules=list(additional_modules),
                                               unet_storage_dtype=unet_storage_dtype)


def forge_model_reload():
    from backend import memory_management
    from backend.args import dynamic_args
    from backend.loader import forge_loader

    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    if model_data.sd_model:
        model_data.sd_model = None
        memory_management.unload_all_models()
    checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
    dynamic_args["forge_unet_storage_dtype"] = model_data.forge_loading_parameters.get("unet_storage_dtype")
    sd_model = forge_loader(checkpoint_info.filename,
                            additional_state_dicts=model_data.forge_loading_parameters.get("additional_modules", []))
    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True
