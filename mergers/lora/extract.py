"""A LoRA from the difference of two checkpoints: ΔW = alpha · W_tuned − beta · W_base, by SVD per layer.

Streamed: each layer's two tensors are read, differenced and factored on the compute device (CUDA when
there is one), then dropped. The layers are kohya's: the U-Net's attention blocks (proj_in/out,
q/k/v/out, feed-forward) and the text encoders' attention and MLP linears; with ``conv_rank`` also the
resnets and the down/upsamplers (3x3 convs at ``conv_rank``, their linears and 1x1 convs at ``rank``),
as kohya's LoCon. A layer whose difference is within ``min_diff`` everywhere (an untouched text
encoder) is left out. The relative error of each layer is reported (0: the difference had rank ≤ rank).

Example:
    >>> result = extract_lora("tuned.safetensors", "base.safetensors", "diff.safetensors", rank=64)
    >>> result.summary
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mergers.arch.detect import detect_architecture, require_lora_support
from mergers.checkpoint import Checkpoint, open_checkpoint
from mergers.engine import CancelToken, ProgressCallback, resolve_device
from mergers.errors import ArchitectureError, MergeCancelled, MergeError
from mergers.lora.apply import RECIPE_KEY
from mergers.lora.keys import QKV, UNET, Target, diffusers_unet_path, lora_names, module_table
from mergers.lora.lowrank import low_rank
from mergers.lora.merge import BASE_MODEL_VERSIONS, LoraMergeResult, kohya_tensors
from mergers.writer import save_checkpoint

DEFAULT_RANK = 128  # the original's default dim
ATTENTION_PARTS = (".attentions.",)
CONV_PARTS = (".resnets.", ".downsamplers.", ".upsamplers.")


@dataclass(frozen=True)
class Layer:
    """One layer to extract: its kohya name, the tensor (or in_proj third) and the rank to keep."""

    name: str
    target: Target
    rank: int


def extract_lora(tuned: str | Path, base: str | Path, output: str | Path, *, rank: int = DEFAULT_RANK,
                 conv_rank: Optional[int] = None, alpha: float = 1.0, beta: float = 1.0, min_diff: float = 0.0,
                 device: Optional[str] = None, dtype: Optional[str] = "fp16", overwrite: bool = False,
                 on_progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> LoraMergeResult:
    """Write the LoRA of ``alpha · tuned − beta · base`` to ``output``.

    Example:
        >>> extract_lora("tuned.safetensors", "base.safetensors", "lora.safetensors", rank=32, conv_rank=16)
    """
    started = time.perf_counter()
    for value, label in ((rank, "rank"), (conv_rank, "conv rank")):
        if value is not None and value < 1:
            raise MergeError(f"{label} {value}: give a whole number ≥ 1")
    compute = resolve_device(device)
    with open_checkpoint(tuned) as model_a, open_checkpoint(base) as model_b:
        family = common_architecture(model_a, model_b)
        layers = extraction_layers(model_b.shapes, family, rank=rank, conv_rank=conv_rank)
        tensors, errors, skipped = {}, [], 0
        for done, (layer, diff) in enumerate(differences(model_a, model_b, layers, alpha, beta, compute), 1):
            if cancel is not None and cancel.is_set():
                raise MergeCancelled("stopped; nothing was written")
            if float(diff.abs().max()) <= min_diff:
                skipped += 1
            else:
                factors = low_rank(diff, layer.rank)
                tensors.update(kohya_tensors(layer.name, factors))
                errors.append(factors.error)
            if on_progress is not None:
                on_progress(done, len(layers), layer.target.key)
        if not tensors:
            raise MergeError(f"{model_a.name} and {model_b.name} do not differ (beyond {min_diff}) in any layer")
        record = {"operation": "extract", "tuned": _named(model_a), "base": _named(model_b), "alpha": alpha,
                  "beta": beta, "rank": rank, "conv_rank": conv_rank, "skipped_layers": skipped,
                  "max_error": max(errors)}
        metadata = extracted_metadata(family, rank, conv_rank, Path(output).stem, record)
        save_checkpoint(output, tensors, dtype=dtype, metadata=metadata, overwrite=overwrite,
                        protect=[model_a.path, model_b.path])
    return LoraMergeResult(Path(output), "svd", max(rank, conv_rank or 0), len(errors), sum(errors) / len(errors),
                           max(errors), time.perf_counter() - started, metadata)


def common_architecture(model_a: Checkpoint, model_b: Checkpoint) -> str:
    """The family both checkpoints are; ArchitectureError when they differ or are unsupported."""
    archs = [detect_architecture(m.shapes, m.metadata, source=m.name) for m in (model_a, model_b)]
    for arch, model in zip(archs, (model_a, model_b)):
        require_lora_support(arch, source=model.name)
    if archs[0].family != archs[1].family:
        raise ArchitectureError(f"{model_a.name} is {archs[0].label}, {model_b.name} is {archs[1].label}: "
                                "a LoRA is extracted from two models of the same architecture")
    return archs[0].family


def extraction_layers(shapes: Mapping[str, tuple[int, ...]], family: str, *, rank: int,
                      conv_rank: Optional[int]) -> list[Layer]:
    """The layers to extract, in file order, each named as kohya names it for ``family``.

    Example:
        >>> extraction_layers(ckpt.shapes, "sd1", rank=8, conv_rank=None)[0].name
        'lora_te_text_model_encoder_layers_0_mlp_fc1'
    """
    targets = {(t.key, t.part): t for t in module_table(shapes).values()}
    layers = []
    for (key, part), target in targets.items():
        layer_rank = _rank_for(key, target.shape, rank, conv_rank)
        if layer_rank is not None:
            layers.append(Layer(kohya_name(key, part, family), target, layer_rank))
    order = {key: n for n, key in enumerate(shapes)}
    return sorted(layers, key=lambda layer: (order[layer.target.key], layer.target.part or 0))


def kohya_name(key: str, part: Optional[int], family: str) -> str:
    """The name kohya's scripts give the layer: diffusers U-Net names for SD1/SD2, LDM ones for SDXL."""
    names = [name for name, p in lora_names(key) if p == part]
    diffusers_unet = key.startswith(UNET) and family in ("sd1", "sd2") and len(names) > 1
    return names[1] if diffusers_unet else names[0]


def differences(model_a: Checkpoint, model_b: Checkpoint, layers: list[Layer], alpha: float, beta: float,
                device: torch.device) -> Iterator[tuple[Layer, torch.Tensor]]:
    """(layer, alpha·A − beta·B) per layer, float32 on ``device``; an in_proj key is read once for q, k, v."""
    cached_key, cached = None, None
    for layer in layers:
        key = layer.target.key
        if key != cached_key:
            if model_a.shape(key) != model_b.shape(key):
                raise ArchitectureError(f"{key} is {list(model_a.shape(key))} in {model_a.name} but "
                                        f"{list(model_b.shape(key))} in {model_b.name}")
            tensor_a = model_a[key].to(device=device, dtype=torch.float32)
            cached_key, cached = key, alpha * tensor_a - beta * model_b[key].to(device=device, dtype=torch.float32)
        yield layer, _part_of(cached, layer.target)


def extracted_metadata(family: str, rank: int, conv_rank: Optional[int], output_name: str,
                       record: Mapping) -> dict[str, str]:
    """kohya's ``ss_*`` keys for an extracted LoRA (alpha = rank, so scale 1) and our recipe."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_base_model_version": BASE_MODEL_VERSIONS[family], "ss_output_name": output_name,
                RECIPE_KEY: json.dumps(record, ensure_ascii=False)}
    if conv_rank is not None:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    return metadata


def _rank_for(key: str, shape: tuple[int, ...], rank: int, conv_rank: Optional[int]) -> Optional[int]:
    """kohya's choice: attention and text-encoder linears at rank; resnet/sampler layers only as LoCon."""
    if "embedding" in key:
        return None  # token and position embeddings are no LoRA layers
    if not key.startswith(UNET):
        return rank
    path = diffusers_unet_path(key[len(UNET):-len(".weight")]) or ""
    if any(part in "." + path for part in ATTENTION_PARTS):
        return rank
    if conv_rank is not None and any(part in "." + path for part in CONV_PARTS):
        return conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else rank
    return None


def _part_of(tensor: torch.Tensor, target: Target) -> torch.Tensor:
    if target.part is None:
        return tensor
    rows = tensor.shape[0] // len(QKV)
    return tensor[target.part * rows:(target.part + 1) * rows]


def _named(model: Checkpoint) -> dict[str, str]:
    return {"name": model.name, "sha256": model.sha256()}
