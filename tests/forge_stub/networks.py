"""Stand-in for Forge's built-in LoRA extension (extensions-builtin/sd_forge_lora/networks.py).

``load_networks`` does nothing while the wanted LoRAs are the applied ones (``current_lora_hash``);
otherwise it clones the U-Net and CLIP patchers from ``forge_objects_original``, adds each LoRA's
patches to the clones and stores them as ``forge_objects_after_applying_lora``. The weights change
later, when a patcher is loaded (``LoraLoader.refresh``).
"""

from modules import sd_models

available = {}  # not in Forge: name → {"unet": {key: delta}, "clip": {key: delta}}, keys as the patchers name them
selected = []  # not in Forge: the names the prompt asks for (<lora:name:1>)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return
    te_multipliers = te_multipliers or [1.0] * len(names)
    unet_multipliers = unet_multipliers or [1.0] * len(names)
    targets = [[name, u, t, False] for name, u, t in zip(names, unet_multipliers, te_multipliers)]
    compiled_hash = str(targets)
    if current_sd.current_lora_hash == compiled_hash:
        return
    current_sd.current_lora_hash = compiled_hash
    current_sd.forge_objects = current_sd.forge_objects_original.shallow_copy()
    for filename, strength_model, strength_clip, online_mode in targets:
        lora = available[filename]
        unet, clip = current_sd.forge_objects.unet.clone(), current_sd.forge_objects.clip.clone()
        unet.add_patches(filename=filename, patches={k: ("diff", (v,)) for k, v in lora["unet"].items()},
                         strength_patch=strength_model, online_mode=online_mode)
        clip.add_patches(filename=filename, patches={k: ("diff", (v,)) for k, v in lora["clip"].items()},
                         strength_patch=strength_clip, online_mode=online_mode)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = unet, clip
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
