"""Stand-in for modules/sd_models.py: the checkpoint list and the loaded model.

``CheckpointInfo``, ``list_models``, ``get_closet_checkpoint_match``, ``select_checkpoint``,
``model_data``, ``load_model`` and ``reload_model_weights`` keep A1111 v1.10.1's names,
parameters and attributes; ``load_model_weights`` applies FP8 weight storage (``opts.fp8_storage``) with
its fp16 copies for LoRAs (``opts.cache_fp16_weight``) as v1.10.1 does. The model itself is a real torch model with SD1.5's key
names at small shapes (built by tests/live_model.py), not an LDM ``LatentDiffusion``.
"""

import collections
import importlib.util
import json
import os
import re
import threading

import safetensors.torch
import torch

from modules import devices, hashes, paths, script_callbacks, sd_hijack, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}
checkpoint_alisases = checkpoint_aliases  # A1111 keeps the old misspelt name too
checkpoints_loaded = collections.OrderedDict()

re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def replace_key(d, key, new_key, value):
    """Rename ``key`` to ``new_key`` in place, keeping the order (A1111's helper)."""
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    keys[keys.index(key)] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


class CheckpointInfo:
    """A checkpoint file as A1111 lists it; ``shorthash`` is known once the file was hashed."""

    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.metadata = read_metadata_from_safetensors(filename) if self.is_safetensors else {}
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):
        """Hash the file (cached), retitle it ``name [shorthash]`` and register the new ids."""
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def _checkpoint_files():
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    found = []
    for folder in folders:
        for root, _, files in os.walk(folder):
            for filename in sorted(files):
                lowered = filename.lower()
                if lowered.endswith((".ckpt", ".safetensors")) and not lowered.endswith((".vae.ckpt", ".vae.safetensors")):
                    found.append(os.path.join(root, filename))
    return sorted(found)


def list_models():
    """Rescan the model folders (A1111's "refresh" button)."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for filename in _checkpoint_files():
        CheckpointInfo(filename).register()


def get_closet_checkpoint_match(search_string):
    """By alias, else the shortest title containing it, else the same without a ``[hash]``."""
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    search_string_without_checksum = re.sub(re_strip_checksum, "", search_string)
    found = sorted([info for info in checkpoints_list.values() if search_string_without_checksum in info.title],
                   key=lambda x: len(x.title))
    return found[0] if found else None


def model_hash(filename):
    """The old hash: 64 KiB at 1 MiB."""
    import hashlib
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def select_checkpoint():
    """The checkpoint ``opts.sd_model_checkpoint`` names, else the first one."""
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError(f"No checkpoints found. When searching for checkpoints, looked at:\n - directory {model_path}")
    return next(iter(checkpoints_list.values()))


def read_metadata_from_safetensors(filename):
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_obj = json.loads(file.read(metadata_len))
    res = {}
    for k, v in json_obj.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                res[k] = json.loads(v)
            except Exception:
                pass
    return res


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        return safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    state = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return state.get("state_dict", state)


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):
        """The loaded model; the first access loads the selected checkpoint."""
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is not None or self.was_loaded_at_least_once:
                    return self.sd_model
                load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        try:
            self.loaded_sd_models.remove(v)
        except ValueError:
            pass
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def _live_model_builder():
    """tests/live_model.py's ``module_from_state_dict`` (A1111: instantiate_from_config)."""
    path = os.path.join(os.path.dirname(paths.script_path), "live_model.py")
    spec = importlib.util.spec_from_file_location("a1111_stub_live_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.module_from_state_dict


def _instantiate(state_dict):
    """A model with the checkpoint's keys; LatentDiffusion has no EMA copy (use_ema=False)."""
    return _live_model_builder()({k: v for k, v in state_dict.items() if not k.startswith("model_ema.")})


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    """Copy the state dict into the model and record which checkpoint it is."""
    sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("model_ema.")}, strict=False)
    # (A1111 casts the model to fp16 here unless --no-half; the stand-in's files are fp16 already.)
    for module in model.modules():
        if hasattr(module, "fp16_weight"):
            del module.fp16_weight
        if hasattr(module, "fp16_bias"):
            del module.fp16_bias
    if check_fp8(model):
        devices.fp8 = True
        first_stage = model.first_stage_model
        model.first_stage_model = None
        for name, module in model.named_modules():
            if _is_linear_or_conv(name, module):
                if shared.opts.cache_fp16_weight:
                    module.fp16_weight = module.weight.data.clone().cpu().half()
                    if getattr(module, "bias", None) is not None:
                        module.fp16_bias = module.bias.data.clone().cpu().half()
                module.to(torch.float8_e4m3fn)
        model.first_stage_model = first_stage
    else:
        devices.fp8 = False
    model.is_sd1, model.is_sd2, model.is_sdxl = True, False, False
    model.lowvram = False
    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256


def check_fp8(model):
    """Settings → Optimizations → FP8 weight: "Enable", or "Enable for SDXL" on an SDXL model."""
    if model is None:
        return None
    if shared.opts.fp8_storage == "Enable":
        return True
    return getattr(model, "is_sdxl", False) and shared.opts.fp8_storage == "Enable for SDXL"


def _is_linear_or_conv(name, module):
    """Stand-in for ``isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))``: the model here is built of plain
    modules, so a layer whose own weight is 2-D (Linear) or 4-D (Conv2d) and is no Embedding."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() in (2, 4) and "embedding" not in name


def get_empty_cond(sd_model):
    """The conditioning of the empty prompt, computed from the text encoder (stand-in: its first token row)."""
    return sd_model.cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight[:1].clone()


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    """Build the model from the checkpoint, hijack it, tell the extensions, compute the empty prompt."""
    checkpoint_info = checkpoint_info or select_checkpoint()
    state_dict = already_loaded_state_dict or read_state_dict(checkpoint_info.filename)
    sd_model = _instantiate(state_dict)
    load_model_weights(sd_model, checkpoint_info, state_dict)
    sd_hijack.model_hijack.hijack(sd_model)
    sd_model.eval()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(sd_model)
    with devices.autocast(), torch.no_grad():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Load another checkpoint's weights into the same model object (A1111 reuses it)."""
    checkpoint_info = info or select_checkpoint()
    sd_model = sd_model or model_data.sd_model
    if sd_model is None:
        return load_model(checkpoint_info)
    if sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model
    sd_hijack.model_hijack.undo_hijack(sd_model)
    try:
        load_model_weights(sd_model, checkpoint_info, read_state_dict(checkpoint_info.filename))
    finally:
        sd_hijack.model_hijack.hijack(sd_model)
        script_callbacks.model_loaded_callback(sd_model)
    with torch.no_grad():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    model_data.set_sd_model(sd_model)
    return sd_model
