"""Stand-in for the built-in Lora extension's ``networks`` module (extensions-builtin/Lora/networks.py).

A1111 applies LoRAs by editing weights in place the first time a layer runs
(its patched ``forward`` calls ``network_apply_weights``). Before the first edit it
copies the layer's weight and bias to the CPU (``network_weights_backup``,
``network_bias_backup``) and records what it applied (``network_current_names``).
When the wanted LoRAs change it copies the backup back and applies them again. Under FP8
weight storage with "Cache FP16 weight for LoRA", a layer's ``fp16_weight``/``fp16_bias`` (made
at load) are what the LoRA is added to, not the fp8 weight (v1.10.1's ``network_apply_weights``).
"""

import torch

loaded_networks = []


class NetworkModule:
    """One layer of a LoRA: a fixed weight delta (stand-in for NetworkModuleLora)."""

    def __init__(self, updown: torch.Tensor):
        self.updown = updown

    def calc_updown(self, orig_weight):
        return self.updown.to(orig_weight.device, orig_weight.dtype), None


class Network:
    """A loaded LoRA: its name, multipliers and layer deltas by ``network_layer_name``."""

    def __init__(self, name, modules):
        self.name = name
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = modules


def assign_network_names_to_compvis_modules(sd_model):
    """Name every layer of the text encoder and the U-Net (``.`` → ``_``), as A1111 does for SD1."""
    mapping = {}
    for root in (sd_model.cond_stage_model.wrapped, sd_model.model):
        for name, module in root.named_modules():
            network_name = name.replace(".", "_")
            mapping[network_name] = module
            module.network_layer_name = network_name
    sd_model.network_layer_mapping = mapping


def store_weights_backup(weight):
    if weight is None:
        return None
    return weight.to("cpu", copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self, "in_proj_weight", weights_backup[0])
            restore_weights_backup(self.out_proj, "weight", weights_backup[1])
        else:
            restore_weights_backup(self, "weight", weights_backup)
    if isinstance(self, torch.nn.MultiheadAttention):
        restore_weights_backup(self.out_proj, "bias", bias_backup)
    else:
        restore_weights_backup(self, "bias", bias_backup)


def network_apply_weights(self):
    """Back the layer up once, then (when the wanted LoRAs changed) restore it and add every delta."""
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None or "weight" not in self._parameters:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError(f"{network_layer_name} - no backup weights found and current weights are not unchanged")
        self.network_weights_backup = store_weights_backup(self.weight)
    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        bias_backup = store_weights_backup(getattr(self, "bias", None))
        if bias_backup is not None and current_names != ():
            raise RuntimeError("no backup bias found and current bias are not unchanged")
        self.network_bias_backup = bias_backup
    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(network_layer_name, None)
            if module is not None:
                with torch.no_grad():
                    if getattr(self, "fp16_weight", None) is None:
                        weight = self.weight
                    else:
                        weight = self.fp16_weight.clone().to(self.weight.device)
                    updown, _ = module.calc_updown(weight)
                    self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
        self.network_current_names = wanted_names


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None
