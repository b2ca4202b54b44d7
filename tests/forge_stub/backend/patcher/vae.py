"""Stand-in for backend/patcher/vae.py: ``VAE`` (``first_stage_model`` and its patcher)."""

from backend import memory_management
from backend.patcher.base import ModelPatcher


class VAE:
    def __init__(self, model=None, device=None, dtype=None, no_init=False):
        if no_init:
            return
        self.first_stage_model = model
        self.latent_channels = 4
        self.patcher = ModelPatcher(model, load_device=memory_management.get_torch_device(),
                                    offload_device=memory_management.cpu)

    def clone(self):
        n = VAE(no_init=True)
        n.patcher = self.patcher.clone()
        n.first_stage_model = self.first_stage_model
        n.latent_channels = self.latent_channels
        return n
