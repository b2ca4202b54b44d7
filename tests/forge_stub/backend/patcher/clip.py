"""Stand-in for backend/patcher/clip.py: ``CLIP`` (a ``JointTextEncoder`` of named encoders and its patcher)."""

import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher


class JointTextEncoder(torch.nn.ModuleDict):
    pass


class CLIP:
    def __init__(self, model_dict={}, tokenizer_dict={}, no_init=False):
        if no_init:
            return
        self.cond_stage_model = JointTextEncoder(model_dict)
        self.tokenizer = dict(tokenizer_dict)
        self.patcher = ModelPatcher(self.cond_stage_model, load_device=memory_management.get_torch_device(),
                                    offload_device=memory_management.cpu)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
