"""The Host: what the tab needs from the program it runs in.

``mergers`` never imports A1111. ``scripts/supermerger.py`` implements this
protocol with A1111's (or Forge's) objects; ``python -m mergers ui`` implements
it over a models folder with no generator. The UI and the API talk only to a
Host, so both run, and are tested, without A1111.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional, Protocol

import torch


@dataclass(frozen=True)
class ModelEntry:
    """A checkpoint the user can pick: its display title, file and A1111 short hash (if known)."""

    title: str
    path: Path
    shorthash: Optional[str] = None


@dataclass(frozen=True)
class GenerationParams:
    """The txt2img settings a preview uses; defaults come from the host's txt2img tab."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = 1


@dataclass(frozen=True)
class Generated:
    """Images a host generated, with the infotext of the first."""

    images: list = field(default_factory=list)  # PIL images
    infotext: str = ""


class LiveModel(Protocol):
    """The loaded model, seen as checkpoint keys → its live tensors (parameters and buffers)."""

    source: Optional[Path]  # the checkpoint file its original weights come from (for restore)

    def tensors(self) -> Mapping[str, torch.Tensor]: ...

    def before_change(self) -> None:
        """Undo what the host patched into the weights (e.g. A1111's applied LoRAs) before they change."""

    def after_change(self, merged: bool) -> None:
        """Tell the host its weights changed (reset conditioning caches; name the merge, or not)."""

    # Optional: ``wrote(key, value)``, called after each tensor written (merged, restored) with the value at
    # the precision it was computed or read in, before the live dtype rounded it: for hosts that keep
    # their own copies of weights (A1111's fp16 copies of fp8-stored ones, mergers/hosts/a1111.py).


class Host(Protocol):
    """The program the merger runs in."""

    data_dir: Path  # history and user presets live here
    models_dir: Path  # where "Save" writes
    grids_dir: Path  # where XYZ plots save their grid images
    # Optional: ``lora_dir``, where the LoRA tab looks for LoRA files (else models/Lora beside the checkpoints).
    # Optional: ``no_swap_reason()``, why ``live_model()`` gave None while a model is loaded (e.g. Forge NF4);
    # the merge's outcome says it instead of "no model loaded".

    def list_models(self) -> list[ModelEntry]: ...

    def resolve(self, name: str) -> Path:
        """A model by title, file name or short hash → its file; CheckpointError when unknown."""

    def live_model(self) -> Optional[LiveModel]:
        """The loaded model to swap merges into, or None (standalone: no model loaded)."""

    def lock(self) -> ContextManager:
        """Held while weights change, so no generation runs meanwhile (A1111's queue lock)."""

    def default_generation(self) -> GenerationParams: ...

    def generate(self, params: GenerationParams, *, extra_info: Mapping[str, Any]) -> Generated:
        """txt2img with the loaded (merged) model; ``extra_info`` goes into the infotext."""

    def can_generate(self) -> bool: ...


def no_lock() -> ContextManager:
    """A lock for hosts that run one thing at a time anyway."""
    return contextlib.nullcontext()
