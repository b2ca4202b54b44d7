"""Stand-in for backend/patcher/lora.py: ``LoraLoader``, which merges LoRA patches into the weights.

As in Forge: ``refresh`` does nothing when the set of patches is the one applied (``loaded_hash``)
unless forced; otherwise it puts every backed-up original parameter back (rebinding it), then for each
patched key keeps the current parameter in ``backup`` and binds a *new* parameter holding the patched
weight. Patches here are ``("diff", (delta,))`` only.
"""

import torch

from backend import memory_management, utils


def get_parameter_devices(model):
    return {key: p.device for key, p in model.named_parameters()}


def set_parameter_devices(model, parameter_devices):
    for key, device in parameter_devices.items():
        p = utils.get_attr(model, key)
        if p.device != device:
            utils.set_attr_raw(model, key, utils.tensor2parameter(p.to(device=device)))
    return model


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight_dtype = weight.dtype
    weight = weight.to(dtype=computation_dtype)
    for strength, patch, strength_model, offset, function in patches:
        kind, (delta,) = patch
        assert kind == "diff", kind
        if strength_model != 1.0:
            weight = weight * strength_model
        weight = weight + strength * delta.to(weight.device, computation_dtype)
    return weight.to(dtype=weight_dtype)


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.refresh_calls = []  # not in Forge: the hash each refresh that did something applied

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current_patches in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current_patches
        memory_management.signal_empty_cache = True
        parameter_devices = get_parameter_devices(self.model)
        for key, weight in self.backup.items():
            utils.set_attr_raw(self.model, key, utils.tensor2parameter(weight))
        self.backup = {}
        set_parameter_devices(self.model, parameter_devices=parameter_devices)
        for (key, online_mode), current_patches in all_patches.items():
            parent, child, weight = utils.get_attr_with_parent(self.model, key)
            assert isinstance(weight, torch.nn.Parameter), key
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            patched = merge_lora_to_weight(current_patches, weight.data, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(patched, requires_grad=False))
        set_parameter_devices(self.model, parameter_devices=parameter_devices)
        self.loaded_hash = hashes
        self.refresh_calls.append(hashes)
