"""Stand-in for backend/patcher/base.py: ``ModelPatcher``, one module with its LoRA patches.

Clones share the module, so they share its ``lora_loader`` (kept on the module).
"""

import copy

from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader
        self.current_device = self.offload_device if current_device is None else current_device

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        lora_identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}
        applied = set()
        model_keys = {k for k, _ in self.model.named_parameters()}
        for key in patches:
            if key in model_keys:
                applied.add(key)
                this_patches.setdefault(key, []).append([strength_patch, patches[key], strength_model, None, None])
        self.lora_patches[lora_identifier] = this_patches
        return applied

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def forge_patch_model(self, target_device=None):
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device
        return self.model

    def forge_unpatch_model(self, target_device=None):
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device
