"""Stand-in for backend/memory_management.py: which patchers are "loaded" (on the compute device).

``load_models_gpu`` calls ``LoadedModel.model_load`` (which refreshes the patcher's LoRAs) only for a
patcher not loaded yet (unloading its clones first); one already loaded is only moved to the front,
as in Forge (a clone with other LoRAs is another patcher, so it is loaded and patched).
"""

import torch

cpu = torch.device("cpu")
current_loaded_models = []
signal_empty_cache = False
unload_calls = 0  # not in Forge: how often unload_all_models ran


def get_torch_device():
    return cpu


def unet_dtype(*args, **kwargs):
    return torch.float32  # Forge on CPU keeps the U-Net in fp32


def text_encoder_dtype(*args, **kwargs):
    return torch.float16


def vae_dtype(*args, **kwargs):
    return torch.float32


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def __eq__(self, other):
        return self.model is other.model

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):
        self.real_model = self.model.forge_patch_model(self.device)
        self.model.refresh_loras()
        return self.real_model

    def model_unload(self, avoid_model_moving=False):
        self.model.forge_unpatch_model(self.model.offload_device)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for model in models:
        loaded = LoadedModel(model)
        if loaded in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(loaded)))
            continue
        unload_model_clones(model)
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def unload_model_clones(model):
    for i in range(len(current_loaded_models) - 1, -1, -1):
        if current_loaded_models[i].model.model is model.model:
            current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def load_model_gpu(model):
    return load_models_gpu([model])


def free_memory(memory_required, device, keep_loaded=[], free_all=False):
    for i in range(len(current_loaded_models) - 1, -1, -1):
        if current_loaded_models[i] not in keep_loaded:
            current_loaded_models.pop(i).model_unload()


def unload_all_models():
    global unload_calls
    unload_calls += 1
    free_memory(1e30, get_torch_device(), free_all=True)


def soft_empty_cache(force=False):
    pass
