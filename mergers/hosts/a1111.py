"""AUTOMATIC1111's web UI (v1.5–v1.10) as a :class:`~mergers.host.Host`.

This module never imports A1111: ``scripts/supermerger.py`` imports A1111's
modules and hands them over in an :class:`A1111Modules`, so the adapter is tested
against a stand-in (``tests/a1111_stub``) on a bare Python.

What A1111 needs from an in-place merge, and where it is done here:

- weights change only while ``call_queue.queue_lock`` is held (:meth:`A1111Host.lock`),
  the lock every txt2img holds; it is not reentrant, so the tab's handlers must not be
  wrapped in ``wrap_gradio_gpu_call``/``wrap_queued_call``;
- live parameter names carry the hijack's ``.wrapped.`` parts (``mergers.swap.live_tensors``
  maps them back to checkpoint keys);
- the built-in Lora extension keeps pre-LoRA copies of the layers it edited; they are
  put back and forgotten before a change (:func:`undo_lora`), so A1111 applies its
  LoRAs again on the new weights at the next generation;
- the prompt-conditioning caches are keyed on the checkpoint, not on the weights, and
  are reset after a change (:func:`reset_conditioning_caches`);
- with FP8 weight storage and "Cache FP16 weight for LoRA", A1111 keeps ``fp16_weight``/``fp16_bias``
  beside each fp8 layer, filled at load from the full-precision weights, and applies LoRAs to those:
  each written key's copy is filled from the merged or restored value as it came, before fp8 rounded it
  (:meth:`A1111LiveModel.wrote`), as A1111's load fills it.

Example:
    >>> from modules import shared, sd_models, processing, call_queue, paths, devices
    >>> host = A1111Host(A1111Modules(shared, sd_models, processing, call_queue, paths, devices),
    ...                  extension_dir=Path(scripts.basedir()))
    >>> session = MergeSession(host)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch

from mergers.errors import CheckpointError, MergeError
from mergers.host import Generated, GenerationParams, ModelEntry
from mergers.models import list_virtual_checkpoints
from mergers.session import MergeSession
from mergers.swap import live_tensors, strip_wrapped

log = logging.getLogger(__name__)

FORGE_REFUSAL = "Forge's model object is not supported yet for in-place merges; use Save"
OUT_OF_DATE = ("the web UI has loaded a checkpoint since this merge, so the merge is no longer in the loaded "
               "model and there is nothing of it to change or restore")

# The first stage (VAE): left alone while the user's own VAE file is loaded over the checkpoint's.
# A1111's fp16 copies of fp8-stored layers (sd_models.load_model_weights), by the parameter they copy.
FP16_COPIES = (("weight", "fp16_weight"), ("bias", "fp16_bias"))
VAE_PREFIX = "first_stage_model."
# A1111 shows 10 hex digits of the sha256; recipes store all 64.
HASH_PATTERN = re.compile(r"[0-9a-fA-F]{10}|[0-9a-fA-F]{64}")
CHECKSUM_SUFFIX = re.compile(r"\s*\[[^]]+]\s*$")  # "name [abcdef0123]", as A1111's re_strip_checksum

# txt2img defaults as A1111 saves them in ui-config.json ("tab/label/value"), newest key first:
# v1.7 moved the sampler, steps and seed into built-in scripts ("customscript/<file>/…").
UI_CONFIG_KEYS = {
    "prompt": ("txt2img/Prompt/value",),
    "negative_prompt": ("txt2img/Negative prompt/value",),
    "steps": ("customscript/sampler.py/txt2img/Sampling steps/value", "txt2img/Sampling steps/value"),
    "sampler": ("customscript/sampler.py/txt2img/Sampling method/value", "txt2img/Sampling method/value"),
    "cfg_scale": ("txt2img/CFG Scale/value",),
    "width": ("txt2img/Width/value",),
    "height": ("txt2img/Height/value",),
    "seed": ("customscript/seed.py/txt2img/Seed/value", "txt2img/Seed/value"),
    "batch_size": ("txt2img/Batch size/value",),
}


@dataclass(frozen=True)
class A1111Modules:
    """The A1111 modules the host uses, imported by ``scripts/supermerger.py`` and passed in."""

    shared: Any  # sd_model, opts, cmd_opts, state
    sd_models: Any  # checkpoints_list, checkpoint_aliases, get_closet_checkpoint_match, list_models
    processing: Any  # StableDiffusionProcessingTxt2Img, process_images
    call_queue: Any  # queue_lock
    paths: Any  # models_path
    devices: Any = None  # autocast() while the empty-prompt conditioning is recomputed


# "Reload UI" runs the extension's script again, while a merge may sit in the loaded model: the session
# (its swapper knows what to restore) outlives the script, one per extension folder in the process.
_SESSIONS: dict[Path, MergeSession] = {}


def session_for(modules: "A1111Modules", *, extension_dir: Path,
                host_class: Optional[type] = None) -> MergeSession:
    """The session of the extension in ``extension_dir``: made once, then the same after a UI reload.

    ``host_class``: ``A1111Host`` (default) or a subclass for a fork (``mergers.hosts.forge.ForgeHost``).

    Example:
        >>> session = session_for(A1111Modules(shared, sd_models, ...), extension_dir=Path(scripts.basedir()))
    """
    host_class = host_class or A1111Host
    key = Path(extension_dir).resolve()
    session = _SESSIONS.get(key)
    if session is None or session.host.modules != modules or type(session.host) is not host_class:
        session = _SESSIONS[key] = MergeSession(host_class(modules, extension_dir=extension_dir))
    return session


class A1111Host:
    """The merger's view of a running A1111: its checkpoint list, loaded model, lock and txt2img."""

    def __init__(self, modules: A1111Modules, *, extension_dir: Path):
        self.modules = modules
        self.data_dir = Path(extension_dir) / "data"
        self._live: Optional[A1111LiveModel] = None

    @property
    def models_dir(self) -> Path:
        """Where A1111 looks for checkpoints: ``--ckpt-dir``, else ``models/Stable-diffusion``."""
        ckpt_dir = getattr(self.modules.shared.cmd_opts, "ckpt_dir", None)
        return Path(ckpt_dir) if ckpt_dir else Path(self.modules.paths.models_path) / "Stable-diffusion"

    @property
    def grids_dir(self) -> Path:
        """Where A1111 saves grids (Settings → Paths): the grids folder, else txt2img's grids folder."""
        opts = self.modules.shared.opts
        folder = Path(getattr(opts, "outdir_grids", "") or getattr(opts, "outdir_txt2img_grids", "")
                      or "outputs/txt2img-grids")
        return folder if folder.is_absolute() else Path(self.modules.paths.data_path) / folder

    @property
    def lora_dir(self) -> Path:
        """The Lora extension's folder: ``--lora-dir``, else ``models/Lora``."""
        lora_dir = getattr(self.modules.shared.cmd_opts, "lora_dir", None)
        return Path(lora_dir) if lora_dir else Path(self.modules.paths.models_path) / "Lora"

    def list_models(self) -> list[ModelEntry]:
        """A1111's checkpoint list, rescanned (as its refresh button does) so saved merges appear."""
        self.modules.sd_models.list_models()
        infos = list(self.modules.sd_models.checkpoints_list.values())
        real = [ModelEntry(info.title, Path(info.filename), info.shorthash) for info in infos]
        return real + self._virtual_entries()

    def _virtual_entries(self) -> list[ModelEntry]:
        """Saved recipes in the checkpoints folder: picked like checkpoints, merged when used."""
        folder = self.models_dir
        if not folder.is_dir():
            return []
        return [ModelEntry(path.relative_to(folder).as_posix(), path, None) for path in list_virtual_checkpoints(folder)]

    def resolve(self, name: str) -> Path:
        """A checkpoint by title, file name, name without extension, short hash or sha256 → its file."""
        info = find_checkpoint(self.modules.sd_models, name.strip())
        if info is not None:
            return Path(info.filename)
        virtual = next((e.path for e in self._virtual_entries() if name.strip() in (e.title, e.path.name)), None)
        if virtual is not None:
            return virtual
        path = Path(name).expanduser()
        if path.is_file():
            return path
        raise CheckpointError(self._unknown(name))

    def live_model(self) -> Optional[A1111LiveModel]:
        """The loaded model (the same object until A1111 loads weights again).

        A Forge model object (``forge_objects``) is not A1111's: this host plans merges there and
        ``no_swap_reason`` says why (``mergers.hosts.forge.ForgeHost`` swaps them into Forge's).
        """
        model = self.modules.shared.sd_model
        if model is None:
            return None
        if hasattr(model, "forge_objects"):
            log.warning(FORGE_REFUSAL)
            return None
        if self._live is None or not self._live.wraps(model):
            self._live = A1111LiveModel(model, self.modules)
        return self._live

    def no_swap_reason(self) -> Optional[str]:
        """Why ``live_model()`` gives no model to swap into while one is loaded (None: none is loaded)."""
        model = self.modules.shared.sd_model
        return FORGE_REFUSAL if model is not None and hasattr(model, "forge_objects") else None

    def model_loaded(self, sd_model: Any) -> None:
        """``script_callbacks.on_model_loaded``: A1111 (re)loaded weights from a file; retire the old view.

        A1111 also calls it after loading only a VAE (Settings → SD VAE: same model object, same
        checkpoint, another ``loaded_vae_file``): the merge is still in the U-Net and text encoder,
        so the view stays and Restore still works; the first stage is the VAE's business then.
        """
        live = self._live
        if live is not None and live.wraps(sd_model) and external_vae(sd_model) != live.vae_file:
            live.vae_file = external_vae(sd_model)
            return
        if live is not None:
            live.out_of_date = True
        self._live = None

    def lock(self) -> ContextManager:
        """A1111's queue lock, held by every txt2img/img2img while it runs."""
        return self.modules.call_queue.queue_lock

    def default_generation(self) -> GenerationParams:
        """The txt2img tab's defaults from ui-config.json, else ours."""
        return generation_defaults(getattr(self.modules.shared.cmd_opts, "ui_config_file", None))

    def generate(self, params: GenerationParams, *, extra_info: Mapping[str, Any]) -> Generated:
        """txt2img with the loaded model, under the queue lock, between ``state.begin()`` and ``end()``."""
        processing, state = self.modules.processing, self.modules.shared.state
        with self.lock():
            p = self._txt2img(params)
            p.extra_generation_params.update(extra_info)
            state.begin(job="supermerger")
            try:
                with contextlib.closing(p):
                    processed = processing.process_images(p)
            except Exception as error:
                raise MergeError(f"txt2img failed: {error}") from error
            finally:
                state.end()
        infotext = processed.infotexts[0] if getattr(processed, "infotexts", None) else processed.infotext(p, 0)
        return Generated(list(processed.images), infotext)

    def can_generate(self) -> bool:
        return True

    def _txt2img(self, params: GenerationParams) -> Any:
        shared = self.modules.shared
        opts = shared.opts
        return self.modules.processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            outpath_samples=opts.outdir_samples or opts.outdir_txt2img_samples,
            outpath_grids=opts.outdir_grids or opts.outdir_txt2img_grids,
            prompt=params.prompt, negative_prompt=params.negative_prompt, steps=params.steps,
            sampler_name=params.sampler, cfg_scale=params.cfg_scale, width=params.width, height=params.height,
            seed=params.seed, batch_size=params.batch_size, n_iter=1, do_not_save_grid=True,
        )

    def _unknown(self, name: str) -> str:
        titles = list(self.modules.sd_models.checkpoints_list)
        close = difflib.get_close_matches(name, titles, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(t) for t in close)}?" if close else ""
        return f"checkpoint {name!r} is not in the web UI's list (models in {self.models_dir}){hint}"


class A1111LiveModel:
    """``shared.sd_model`` seen as checkpoint keys → live tensors, with A1111's bookkeeping around changes."""

    def __init__(self, model: torch.nn.Module, modules: A1111Modules):
        self.model = model
        self._modules = modules
        self.source: Optional[Path] = _source_of(model)
        self.out_of_date = False  # set when A1111 loads weights again: a Swapper must not restore into them
        self.vae_file = external_vae(model)  # the VAE file A1111 loaded over the checkpoint's, if any
        self._fp16_copies: Optional[dict[str, tuple[torch.nn.Module, str]]] = None  # found once per change

    def wraps(self, model: Any) -> bool:
        """Whether this is still a view of ``model`` holding the same checkpoint."""
        return model is self.model and _source_of(model) == self.source

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """Checkpoint key → live tensor; without the first stage while the user's own VAE file is loaded
        over the checkpoint's (Settings → SD VAE): A1111 keeps that VAE across loads, so a merge leaves it
        alone, and a restore must not read the checkpoint's VAE back over it."""
        self._check_current()
        tensors = live_tensors(self.model)
        if external_vae(self.model) is None:
            return tensors
        return {key: tensor for key, tensor in tensors.items() if not key.startswith(VAE_PREFIX)}

    def before_change(self) -> None:
        """Put back the weights the Lora extension saved and forget its state, for every layer."""
        self._check_current()
        self._fp16_copies = fp16_copy_slots(self.model)
        undone = sum(undo_lora(module) for module in self.model.modules())
        if undone:
            log.info("restored %d layers from the Lora extension's backups; it re-applies its LoRAs next time", undone)

    def after_change(self, merged: bool) -> None:
        """Drop what A1111 computed from the old weights: conditioning caches, fp16 copies, empty prompt."""
        reset_conditioning_caches(self._modules.processing)
        self._fp16_copies = None
        self._recompute_empty_prompt()

    def wrote(self, key: str, value: torch.Tensor) -> None:
        """``key`` now holds ``value`` (merged or read back, not yet rounded to fp8): renew A1111's fp16 copy
        of it, if it keeps one, as its load makes it (``weight.data.clone().cpu().half()`` of the weights
        before the fp8 cast), so LoRAs go onto the same fp16 weights a fresh load of these values gives."""
        slots = self._fp16_copies if self._fp16_copies is not None else fp16_copy_slots(self.model)
        slot = slots.get(key)
        if slot is not None:
            module, name = slot
            setattr(module, name, value.detach().to(device="cpu", dtype=torch.float16, copy=True))

    def _check_current(self) -> None:
        """A1111 reuses the model object for another checkpoint (or swaps in another object): refuse then."""
        if self.out_of_date or not self.wraps(self._modules.shared.sd_model):
            raise MergeError(OUT_OF_DATE)

    def _recompute_empty_prompt(self) -> None:
        # A1111 computes the empty prompt's conditioning once at load (sd_models.load_model, v1.6+).
        get_empty_cond = getattr(self._modules.sd_models, "get_empty_cond", None)
        if get_empty_cond is None or getattr(self.model, "cond_stage_model_empty_prompt", None) is None:
            return
        devices = self._modules.devices
        autocast = devices.autocast() if devices is not None else contextlib.nullcontext()
        try:
            with autocast, torch.no_grad():
                self.model.cond_stage_model_empty_prompt = get_empty_cond(self.model)
        except Exception:
            log.warning("could not recompute the empty prompt's conditioning; it is the old model's", exc_info=True)


def external_vae(model: Any) -> Optional[str]:
    """The VAE file A1111 loaded over the checkpoint's own (``sd_vae.load_vae`` sets it), or None."""
    return getattr(model, "loaded_vae_file", None) or None


def _source_of(model: Any) -> Optional[Path]:
    info = getattr(model, "sd_checkpoint_info", None)
    return Path(info.filename) if info is not None else None


def find_checkpoint(sd_models: Any, name: str) -> Any:
    """A1111's CheckpointInfo for ``name``, or None; never a merely similar model.

    Looks up A1111's aliases (title, name, name without extension, old hash, short hash,
    sha256), then the title with a stale ``[hash]`` (warned), then hashes the files whose
    hash A1111 does not know yet when ``name`` looks like a hash.

    Example:
        >>> find_checkpoint(sd_models, "v1-5-pruned-emaonly.safetensors [6ce0161689]").filename
        '/webui/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors'
    """
    info = sd_models.checkpoint_aliases.get(name)
    if info is None:
        info = _same_name(sd_models, name)
    if info is None and HASH_PATTERN.fullmatch(name):
        info = _by_hashing(sd_models, name.lower())
    return info


def _same_name(sd_models: Any, name: str) -> Any:
    """A1111's closest match, accepted only when it is the same file name (its hash may differ)."""
    bare = CHECKSUM_SUFFIX.sub("", name)
    match = sd_models.get_closet_checkpoint_match(name)
    if match is None or bare not in (match.name, match.name_for_extra, match.model_name):
        return None
    if bare != name:
        log.warning("%s: the file's hash has changed since; using %s", name, match.title)
    return match


def _by_hashing(sd_models: Any, wanted: str) -> Any:
    """Hash (A1111's cache) the listed files not hashed yet until one has this short hash or sha256."""
    for info in list(sd_models.checkpoints_list.values()):
        if info.shorthash is None:
            info.calculate_shorthash()
        if wanted in (info.shorthash, info.sha256):
            return info
    return None


def undo_lora(module: torch.nn.Module) -> bool:
    """Copy the Lora extension's backups back into ``module`` and reset its LoRA state.

    A1111 keeps ``network_weights_backup`` (a tuple for MultiheadAttention) and
    ``network_bias_backup`` on every layer a LoRA edited, and ``network_current_names``
    for what it applied. With the state reset, the next forward pass backs up the
    merged weights and applies the LoRAs on them. Returns whether ``module`` had any.
    """
    weights = getattr(module, "network_weights_backup", None)
    bias = getattr(module, "network_bias_backup", None)
    if weights is None and bias is None and not getattr(module, "network_current_names", ()):
        return False
    with torch.no_grad():
        for owner, name, backup in _lora_targets(module, weights, bias):
            current = getattr(owner, name, None)
            if backup is not None and current is not None:
                current.copy_(backup)
    if weights is not None and bias is None and hasattr(module, "network_bias_backup"):
        _drop_lora_bias(module)
    module.network_weights_backup = None
    module.network_bias_backup = None
    module.network_current_names = ()
    return True


def _lora_targets(module: torch.nn.Module, weights: Any, bias: Any) -> list[tuple[Any, str, Any]]:
    if isinstance(module, torch.nn.MultiheadAttention):
        first, second = weights if weights is not None else (None, None)
        return [(module, "in_proj_weight", first), (module.out_proj, "weight", second), (module.out_proj, "bias", bias)]
    return [(module, "weight", weights), (module, "bias", bias)]


def _drop_lora_bias(module: torch.nn.Module) -> None:
    """A None bias backup next to a weight backup means the layer had no bias: one a LoRA added goes (as in A1111)."""
    owner = module.out_proj if isinstance(module, torch.nn.MultiheadAttention) else module
    if getattr(owner, "bias", None) is not None:
        owner.bias = None


def reset_conditioning_caches(processing: Any) -> None:
    """Forget cached prompt conditionings: A1111 keys them on the checkpoint, not on its weights."""
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    txt2img = getattr(processing, "StableDiffusionProcessingTxt2Img", None)
    if txt2img is not None and hasattr(txt2img, "cached_hr_c"):
        txt2img.cached_hr_c = [None, None]
        txt2img.cached_hr_uc = [None, None]


def fp16_copy_slots(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Checkpoint key → (layer, ``fp16_weight``/``fp16_bias``) for each fp16 copy A1111 keeps (FP8 storage
    with "Cache FP16 weight for LoRA"); empty otherwise.

    Example:
        >>> fp16_copy_slots(shared.sd_model)["model.diffusion_model.out.2.weight"][1]
        'fp16_weight'
    """
    slots = {}
    for name, module in model.named_modules():
        for param, copy in FP16_COPIES:
            if getattr(module, copy, None) is not None:
                slots[strip_wrapped(f"{name}.{param}" if name else param)] = (module, copy)
    return slots


def generation_defaults(ui_config_file: Optional[str]) -> GenerationParams:
    """GenerationParams from A1111's ui-config.json where it has them, ours elsewhere.

    Example:
        >>> generation_defaults("/webui/ui-config.json").steps
        20
    """
    config = _read_ui_config(ui_config_file)
    defaults = GenerationParams()
    values = {}
    for field, keys in UI_CONFIG_KEYS.items():
        raw = next((config[k] for k in keys if k in config), None)
        if raw is not None:
            value = _as_type_of(getattr(defaults, field), raw)
            if value is None:
                log.warning("ui-config.json: ignoring %s = %r", keys[0], raw)
            else:
                values[field] = value
    return dataclasses.replace(defaults, **values)


def _read_ui_config(path: Optional[str]) -> dict:
    if not path or not Path(path).is_file():
        return {}
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("cannot read %s: %s", path, error)
        return {}
    return config if isinstance(config, dict) else {}


def _as_type_of(example: Any, raw: Any) -> Any:
    """``raw`` as ``example``'s type (str, int or float), or None when it is not one."""
    if isinstance(example, str):
        return raw if isinstance(raw, str) else None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return type(example)(raw)
