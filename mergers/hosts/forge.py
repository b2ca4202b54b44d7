"""Forge and Forge Neo ("Forge 2") as a :class:`~mergers.host.Host`: merges swapped into Forge's model in place.

Forge's web UI is A1111's (checkpoint list, queue lock, ``processing``), so :class:`ForgeHost`
is the A1111 host with another live model. This module imports nothing of Forge: Forge's objects
are reached through ``shared.sd_model``. What differs from A1111 (facts: ``shared/forge-notes.md``):

- ``sd_model`` is a ``ForgeDiffusionEngine``; the weights sit in three modules under patchers
  (``forge_objects.unet/clip/vae``) with converted names (:mod:`mergers.hosts.forge_keys`): a
  checkpoint key may write several live tensors (CLIP-G's ``in_proj``) or a transposed one;
- every weight is an inference tensor (Forge loads under ``torch.inference_mode()``): written there;
- Forge's LoRA loader *replaces* LoRA'd parameters (keeping the originals in ``lora_loader.backup``):
  before a change its LoRAs are taken out (``refresh`` with no patches), after it they are put back
  on the new weights, and parameters are looked up by name at each use, never kept;
- three-entry conditioning caches; parts loaded from their own files (``forge_additional_modules``)
  are left alone; NF4/FP4/GGUF storage and fp8 ``scale_weight`` layers cannot take merged values
  exactly, so merges are not swapped in there (the outcome says why; Save writes them).

reForge and Forge Classic ("Forge 1": A1111's model object with ``forge_objects`` added) are told
apart and refused in the same way (named in the message), never half-swapped.

Example:
    >>> host = ForgeHost(A1111Modules(shared, sd_models, processing, call_queue, paths, devices),
    ...                  extension_dir=Path(scripts.basedir()))
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from mergers.checkpoint import open_checkpoint
from mergers.errors import MergeError
from mergers.hosts.a1111 import OUT_OF_DATE, A1111Host, A1111Modules, _source_of
from mergers.hosts.forge_keys import CLIP, SPLIT, TRANSPOSE, UNET, VAE, LiveTarget, forge_target

log = logging.getLogger(__name__)

A1111, FORGE, REFORGE = "AUTOMATIC1111", "Forge", "reForge / Forge Classic"
FORGE_ENGINE_CLASS = "ForgeDiffusionEngine"  # backend.diffusion_engine.base (Forge, Neo)
FORGE_CACHE_ENTRIES = 3  # Forge's cached_c/cached_uc: params, conditioning, extra generation params

REFORGE_REFUSAL = (f"{REFORGE}: swapping merges into its model in place is not supported, so merges are "
                   "planned, not swapped in; Save writes the merge to a file, which the web UI can load")
QUANTIZED_REFUSAL = ("the loaded model keeps its {part} weights as {kind} ({name}), which merged weights cannot "
                     "be written into exactly, so merges are planned, not swapped in; Save writes the merge to a "
                     "file, which Forge can load (and quantize as it loads)")
SCALED_REFUSAL = ("the loaded model's {part} has fp8 layers scaled by scale_weight ({names}): merged weights cannot "
                  "be written into them as Forge would load them, so merges are planned, not swapped in; Save "
                  "writes the merge to a file, which Forge can load")
PENDING_RELOAD = ("Forge loads the checkpoint, modules or storage picked in its UI at the next generation, so the "
                  "model loaded now is about to be replaced and merges are planned, not swapped in; generate once, "
                  "then merge (Save writes this merge to a file)")
QUANTIZED_STORAGE = {"nf4": "NF4", "fp4": "FP4", "gguf": "GGUF"}  # KModel.storage_dtype strings

# A file loaded beside the checkpoint (VAE / text encoder) → the live names it replaced; text encoders
# are told apart by width. (part, live prefix); "" = the whole part.
EXTERNAL_VAE = (VAE, "")
EXTERNAL_T5 = (CLIP, "t5xxl.")
EXTERNAL_TEXT_ENCODERS = (CLIP, "")  # unreadable here (e.g. GGUF) or unknown: leave every text encoder alone
CLIP_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
LAYER_NORM_BIAS = ("layer_norm1.bias", "ln_1.bias")


def model_webui(sd_model: Any) -> str:
    """Which web UI made ``sd_model``: FORGE (Forge 2 engine), REFORGE (A1111 object + ``forge_objects``) or A1111.

    ``forge_objects`` alone is on all the Forges; Forge 2's model is a ``ForgeDiffusionEngine``.

    Example:
        >>> model_webui(shared.sd_model)
        'Forge'
    """
    if any(cls.__name__ == FORGE_ENGINE_CLASS for cls in type(sd_model).__mro__):
        return FORGE
    return REFORGE if hasattr(sd_model, "forge_objects") else A1111


def installed_webui(has_module: Optional[Callable[[str], bool]] = None) -> str:
    """The web UI this process runs in, from its top-level packages (found, not imported).

    Forge and Neo ship ``backend`` and ``modules_forge``; reForge and Classic ``ldm_patched`` and
    ``modules_forge``; A1111 none of these.

    Example:
        >>> installed_webui()
        'AUTOMATIC1111'
    """
    has = has_module or (lambda name: importlib.util.find_spec(name) is not None)
    if not has("modules_forge"):
        return A1111
    return FORGE if has("backend") and not has("ldm_patched") else REFORGE


class ForgeHost(A1111Host):
    """A1111's host with Forge's live model: the checkpoint list, lock and txt2img are the web UI's own."""

    def __init__(self, modules: A1111Modules, *, extension_dir: Path):
        super().__init__(modules, extension_dir=extension_dir)
        self._forge: Optional[ForgeLiveModel] = None
        self._refusal: Optional[str] = None  # why the last live_model() gave None
        self._logged: Optional[str] = None  # the last reason logged (live_model runs for every infotext)

    def live_model(self) -> Any:
        """Forge's model as a ForgeLiveModel; None (with the reason in ``no_swap_reason``) where a merge
        cannot be written into it exactly; A1111's adapter for an A1111-style model without Forge objects."""
        model = self.modules.shared.sd_model
        self._refusal = None
        # Forge loads a newly picked checkpoint lazily, before the next batch: the model now is about to go.
        if (model is None or model_webui(model) == FORGE) and reload_pending(self.modules.sd_models):
            return self._refuse(PENDING_RELOAD)
        if model is None:
            return None
        kind = model_webui(model)
        if kind == A1111:
            return super().live_model()
        if kind == REFORGE:
            return self._refuse(REFORGE_REFUSAL)
        if self._forge is None or not self._forge.wraps(model):
            self._forge = ForgeLiveModel(model, self.modules)
        if self._forge.refusal:
            return self._refuse(self._forge.refusal)
        return self._forge

    def no_swap_reason(self) -> Optional[str]:
        """Why the last ``live_model()`` gave no model to swap into, if a model is loaded."""
        return self._refusal

    def model_loaded(self, sd_model: Any) -> None:
        """``on_model_loaded``: Forge built a new model (``forge_model_reload``); the old view is retired."""
        if self._forge is not None:
            self._forge.out_of_date = True
            self._forge = None
        super().model_loaded(sd_model)

    def _refuse(self, reason: str) -> None:
        """No model to swap into, and why (logged once per reason)."""
        if reason != self._logged:
            log.warning(reason)
            self._logged = reason
        self._refusal = reason


class ForgeLiveModel:
    """Forge's ``sd_model`` seen as checkpoint keys → live tensors (:class:`ForgeTensor`), with Forge's
    LoRA loader and caches handled around changes."""

    def __init__(self, model: Any, modules: A1111Modules):
        self.model = model
        self._modules = modules
        self.source: Optional[Path] = _source_of(model)
        self.out_of_date = False
        self.left_alone = external_parts(additional_modules(modules))
        self.refusal = storage_refusal(self._roots(), self.left_alone)

    def wraps(self, model: Any) -> bool:
        return model is self.model and _source_of(model) == self.source

    def tensors(self) -> Mapping[str, Any]:
        """The source file's keys (and any other spelling asked for) → their live targets, resolved at use."""
        self._check_current()
        keys: Iterable[str] = ()
        try:
            if self.source is not None:
                with open_checkpoint(self.source) as ckpt:
                    keys = list(ckpt.shapes)
        except (OSError, MergeError):  # gone or rewritten: keys still map on demand, the Swapper says the rest
            log.warning("%s: cannot read its key list", self.source)
        return ForgeTensors(self._roots(), keys, self.left_alone)

    def before_change(self) -> None:
        """Take Forge's applied LoRAs out of the weights: ``refresh`` with no patches puts the originals back."""
        self._check_current()
        with torch.inference_mode():
            for patcher, loader in _loaders(self.model.forge_objects):
                loader.refresh(lora_patches={}, offload_device=patcher.offload_device)

    def after_change(self, merged: bool) -> None:
        """Apply the LoRAs again on the new weights, and forget the conditioning computed from the old ones."""
        objects = getattr(self.model, "forge_objects_after_applying_lora", None) or self.model.forge_objects
        with torch.inference_mode():
            for patcher, loader in _loaders(objects):
                loader.refresh(lora_patches=getattr(patcher, "lora_patches", {}), offload_device=patcher.offload_device)
        reset_forge_caches(self._modules.processing)

    def _roots(self) -> dict[str, torch.nn.Module]:
        objects = self.model.forge_objects
        roots = {UNET: getattr(objects.unet, "model", None),
                 CLIP: getattr(getattr(objects.clip, "patcher", None), "model", None),
                 VAE: getattr(getattr(objects.vae, "patcher", None), "model", None)}
        return {part: root for part, root in roots.items() if root is not None}

    def _check_current(self) -> None:
        if self.out_of_date or not self.wraps(self._modules.shared.sd_model):
            raise MergeError(OUT_OF_DATE)


class ForgeTensors(Mapping):
    """Checkpoint key → :class:`ForgeTensor`, for the keys Forge holds (parts loaded from other files left out)."""

    def __init__(self, roots: Mapping[str, torch.nn.Module], keys: Iterable[str],
                 left_alone: frozenset[tuple[str, str]] = frozenset()):
        self._roots = roots
        self._left_alone = left_alone
        self._targets: dict[str, ForgeTensor] = {}
        for key in keys:
            self.get(key)

    def __getitem__(self, key: str) -> ForgeTensor:
        target = self._targets.get(key)
        if target is None:  # e.g. a merge's model A spells a key otherwise than the loaded file
            target = self._target(key)
            if target is None:
                raise KeyError(key)
            self._targets[key] = target
        return target

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def _target(self, key: str) -> Optional[ForgeTensor]:
        spec = forge_target(key)
        if spec is None or spec.part not in self._roots or _is_left_alone(spec, self._left_alone):
            return None
        root = self._roots[spec.part]
        if not all(_find(root, name) is not None for name in spec.names):
            return None
        return ForgeTensor(key, spec, root)


class ForgeTensor:
    """One checkpoint key's live tensor(s) in Forge, in the checkpoint's layout.

    Quacks like the tensor ``mergers.swap.Swapper`` writes (shape, dtype, device, ``copy_``,
    ``detach``) and looks its parameters up by name at every use, since Forge's LoRA loader and
    device moves replace parameter objects. Writes run under ``torch.inference_mode()``.
    """

    def __init__(self, key: str, spec: LiveTarget, root: torch.nn.Module):
        self.key = key
        self.spec = spec
        self._root = root

    def parts(self) -> list[torch.Tensor]:
        """The live tensors now (resolved by name)."""
        parts = [_find(self._root, name) for name in self.spec.names]
        missing = [name for name, part in zip(self.spec.names, parts) if part is None]
        if missing:
            raise MergeError(f"{self.key}: {missing[0]} is no longer in Forge's model; reload the checkpoint")
        return parts

    @property
    def shape(self) -> torch.Size:
        parts = self.parts()
        if self.spec.transform == SPLIT:
            return torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
        if self.spec.transform == TRANSPOSE:
            return torch.Size(tuple(reversed(parts[0].shape)))
        return parts[0].shape

    @property
    def dtype(self) -> torch.dtype:
        return self.parts()[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts()[0].device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts())

    def is_inference(self) -> bool:
        """Always: written only under inference mode, and never handed to the engine as an ``out=`` tensor."""
        return True

    def data_ptr(self) -> int:
        return -1  # never the memory of a merged tensor: every write goes through copy_

    def detach(self) -> torch.Tensor:
        """The live value in the checkpoint's layout (a new tensor for split/transposed keys)."""
        parts = [p.detach() for p in self.parts()]
        if self.spec.transform == SPLIT:
            return torch.cat(parts)
        if self.spec.transform == TRANSPOSE:
            return parts[0].t()
        return parts[0]

    def copy_(self, value: torch.Tensor, non_blocking: bool = False) -> ForgeTensor:
        """Write ``value`` (checkpoint layout) into the live tensor(s); ``copy_`` rounds to the storage dtype
        (fp16, bf16, fp8) exactly as Forge's own load does."""
        with torch.inference_mode():
            parts = self.parts()
            for part in parts:
                _check_writable(self.key, part)
            if self.spec.transform == SPLIT:
                pieces = value.chunk(len(parts))
            elif self.spec.transform == TRANSPOSE:
                pieces = (value.t(),)
            else:
                pieces = (value,)
            for part, piece in zip(parts, pieces, strict=True):
                part.copy_(piece)
        return self


def _find(root: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    """``root``'s tensor at a dotted name, or None (Forge's ``utils.get_attr``, without raising)."""
    value: Any = root
    for attr in name.split("."):
        value = getattr(value, attr, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def _quantized_kind(tensor: torch.Tensor) -> Optional[str]:
    """How a parameter stores packed weights (Forge's own LoRA loader checks the same attributes), or None."""
    if hasattr(tensor, "bnb_quantized"):
        return "NF4/FP4 (bitsandbytes)"
    if getattr(tensor, "gguf_cls", None) is not None:
        return "GGUF"
    if not tensor.is_floating_point():
        return f"packed {tensor.dtype}"
    return None


def _check_writable(key: str, tensor: torch.Tensor) -> None:
    kind = _quantized_kind(tensor)
    if kind is not None:
        raise MergeError(f"{key}: Forge stores it as {kind}, which a merge cannot be written into exactly; use Save")


def storage_refusal(roots: Mapping[str, torch.nn.Module],
                    left_alone: frozenset[tuple[str, str]] = frozenset()) -> Optional[str]:
    """Why merges cannot be written into these parts exactly (quantized or scaled storage), or None.

    Example:
        >>> storage_refusal({"unet": nf4_kmodel})
        'the loaded model keeps its unet weights as NF4 (…), which merged weights cannot be written …'
    """
    for part, root in roots.items():
        storage = getattr(root, "storage_dtype", None)
        if isinstance(storage, str) and storage.lower() in QUANTIZED_STORAGE and (part, "") not in left_alone:
            return QUANTIZED_REFUSAL.format(part=part, kind=QUANTIZED_STORAGE[storage.lower()], name="storage_dtype")
        for name, tensor in root.named_parameters():
            kind = _quantized_kind(tensor)
            if kind is not None and not _name_left_alone(part, name, left_alone):
                return QUANTIZED_REFUSAL.format(part=part, kind=kind, name=name)
        scaled = [name for name, module in root.named_modules()
                  if getattr(module, "scale_weight", None) is not None and not _name_left_alone(part, name, left_alone)]
        if scaled:
            more = f" and {len(scaled) - 3} more" if len(scaled) > 3 else ""
            return SCALED_REFUSAL.format(part=part, names=", ".join(scaled[:3]) + more)
    return None


def _loaders(objects: Any) -> list[tuple[Any, Any]]:
    """(patcher, lora_loader) of each part's patcher; one per loader (clones share their module's loader)."""
    patchers = [getattr(objects, "unet", None), getattr(getattr(objects, "clip", None), "patcher", None),
                getattr(getattr(objects, "vae", None), "patcher", None)]
    seen: set[int] = set()
    found = []
    for patcher in patchers:
        loader = getattr(patcher, "lora_loader", None)
        if loader is not None and id(loader) not in seen:
            seen.add(id(loader))
            found.append((patcher, loader))
    return found


def reset_forge_caches(processing: Any) -> None:
    """Forget cached prompt conditionings (Forge keys them on the prompt and checkpoint, not the weights)."""
    processing.StableDiffusionProcessing.cached_c = [None] * FORGE_CACHE_ENTRIES
    processing.StableDiffusionProcessing.cached_uc = [None] * FORGE_CACHE_ENTRIES
    txt2img = getattr(processing, "StableDiffusionProcessingTxt2Img", None)
    if txt2img is not None and hasattr(txt2img, "cached_hr_c"):
        txt2img.cached_hr_c = [None] * FORGE_CACHE_ENTRIES
        txt2img.cached_hr_uc = [None] * FORGE_CACHE_ENTRIES


def reload_pending(sd_models: Any) -> bool:
    """Whether Forge's next ``forge_model_reload()`` will build another model (the user picked another
    checkpoint, VAE / text encoder or storage dtype since the last load; Forge compares the same strings)."""
    model_data = getattr(sd_models, "model_data", None)
    loading = getattr(model_data, "forge_loading_parameters", None)
    return bool(loading) and getattr(model_data, "forge_hash", None) != str(loading)


def additional_modules(modules: A1111Modules) -> list[str]:
    """Files Forge loaded over the checkpoint's own parts: the loading parameters of the model, else the setting."""
    model_data = getattr(modules.sd_models, "model_data", None)
    loading = getattr(model_data, "forge_loading_parameters", None) or {}
    files = loading.get("additional_modules")
    if files is None:
        files = getattr(modules.shared.opts, "forge_additional_modules", None) or []
    return [str(file) for file in files]


def external_parts(files: Iterable[str]) -> frozenset[tuple[str, str]]:
    """The (part, live prefix) pairs that files loaded beside the checkpoint replaced."""
    parts = set()
    for file in files:
        try:
            with open_checkpoint(file) as ckpt:
                shapes = dict(ckpt.shapes)
        except Exception:  # noqa: BLE001 - e.g. a GGUF text encoder, which our reader does not open
            log.info("%s: not readable here; leaving every text encoder alone", file)
            parts.add(EXTERNAL_TEXT_ENCODERS)
            continue
        parts.add(module_part(shapes))
    return frozenset(parts)


def module_part(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
    """What a VAE / text-encoder file replaces, from its keys and shapes.

    Example:
        >>> module_part({"decoder.conv_in.weight": (512, 4, 3, 3)})
        ('vae', '')
    """
    if any(key.endswith("decoder.conv_in.weight") for key in shapes):
        return EXTERNAL_VAE
    if any("encoder.block." in key or "enc.blk." in key for key in shapes):
        return EXTERNAL_T5
    width = next((shape[0] for key, shape in shapes.items() if key.endswith(LAYER_NORM_BIAS) and shape), None)
    encoder = CLIP_WIDTHS.get(width)
    return (CLIP, f"{encoder}.") if encoder else EXTERNAL_TEXT_ENCODERS


def _is_left_alone(spec: LiveTarget, left_alone: frozenset[tuple[str, str]]) -> bool:
    return any(_name_left_alone(spec.part, name, left_alone) for name in spec.names)


def _name_left_alone(part: str, name: str, left_alone: frozenset[tuple[str, str]]) -> bool:
    return any(part == where and name.startswith(prefix) for where, prefix in left_alone)
