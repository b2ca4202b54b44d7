"""Stand-in for backend/patcher/unet.py: ``UnetPatcher`` over a ``KModel``
(``.diffusion_model``, ``.storage_dtype``)."""

import copy

import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher


class KModel(torch.nn.Module):
    """backend/modules/k_model.py: the diffusion model with its storage dtype (a dtype, or 'nf4'/'fp4'/'gguf')."""

    def __init__(self, model, storage_dtype):
        super().__init__()
        self.diffusion_model = model
        self.storage_dtype = storage_dtype


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model):
        return UnetPatcher(model, load_device=memory_management.get_torch_device(),
                           offload_device=memory_management.cpu)

    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n
