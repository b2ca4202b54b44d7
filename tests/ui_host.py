"""A Host for the tab's tests: a temp models folder of tiny real-layout checkpoints, a live model, a fake generator.

The models have every key of a real SD1.5 (``a``, ``b``, ``c``) or SDXL (``xl``)
checkpoint at scaled-down shapes. The live model is loaded from model A's file
(``tests/live_model.py``'s FakeLive); the generator paints an image whose colour
is a checksum of the live weights, so a merge visibly changes the preview, and
records the parameters it got.

Example:
    >>> host = UiHost.create(tmp_path)
    >>> session = MergeSession(host)
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from mergers.demo import tiny_state_dict
from mergers.errors import CheckpointError
from mergers.host import Generated, GenerationParams, ModelEntry
from mergers.writer import save_checkpoint
from tests.live_model import FakeLive

# file name → (family, seed)
MODELS = {"a.safetensors": ("sd1", 1), "b.safetensors": ("sd1", 2), "c.safetensors": ("sd1", 3),
          "xl.safetensors": ("sdxl", 4)}
IMAGE_SIZE = 64  # the fake preview's width and height, whatever the params ask
SHORTHASH_DIGITS = 10


# Four tiny SD1 models a, b, c, d (seeds 1–4), for chained recipes and the like.
SD1_ABCD = {f"{name}.safetensors": ("sd1", seed) for seed, name in enumerate("abcd", start=1)}


def write_models(folder: Path, models: Mapping[str, tuple[str, int]] = MODELS) -> list[Path]:
    """The tiny checkpoints of ``models`` (file name → family, seed) in ``folder`` (written once)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (family, seed) in models.items():
        path = folder / name
        if not path.exists():
            save_checkpoint(path, tiny_state_dict(family, seed=seed))
        paths.append(path)
    return paths


def weights_checksum(tensors: Mapping[str, torch.Tensor]) -> int:
    """A 32-bit checksum of every floating tensor's bytes (any merge changes it)."""
    crc = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point():
            crc = zlib.crc32(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), crc)
    return crc


class UiHost:
    """The Host protocol over a temp folder; ``generated`` records each generate call's params."""

    def __init__(self, models_dir: Path, data_dir: Path, *, live_from: Optional[str] = "a.safetensors"):
        self.models_dir = models_dir
        self.data_dir = data_dir
        self.grids_dir = data_dir / "xyz"
        self.generated: list[GenerationParams] = []
        self.extra_infos: list[Mapping[str, Any]] = []
        self._lock = threading.Lock()
        self._live = FakeLive.load(models_dir / live_from) if live_from else None

    @classmethod
    def create(cls, root: Path, **options) -> UiHost:
        """A host over ``root/models`` (filled with the tiny models) and ``root/data``."""
        write_models(root / "models")
        return cls(root / "models", root / "data", **options)

    def list_models(self) -> list[ModelEntry]:
        entries = []
        for path in sorted(self.models_dir.glob("*.safetensors")):
            shorthash = hashlib.sha256(path.read_bytes()).hexdigest()[:SHORTHASH_DIGITS]
            entries.append(ModelEntry(f"{path.name} [{shorthash}]", path, shorthash))
        return entries

    def resolve(self, name: str) -> Path:
        for entry in self.list_models():
            if name in (entry.title, entry.path.name, entry.path.stem, entry.shorthash, str(entry.path)):
                return entry.path
        raise CheckpointError(f"model {name!r} is not in {self.models_dir}")

    def live_model(self) -> Optional[FakeLive]:
        return self._live

    def lock(self):
        return self._lock

    def default_generation(self) -> GenerationParams:
        return GenerationParams(prompt="a tiny cat", negative_prompt="blurry", steps=4, width=IMAGE_SIZE,
                                height=IMAGE_SIZE, seed=1234)

    def can_generate(self) -> bool:
        return self._live is not None

    def generate(self, params: GenerationParams, *, extra_info: Mapping[str, Any]) -> Generated:
        """One image per batch entry, its colour the checksum of the live weights."""
        self.generated.append(params)
        self.extra_infos.append(dict(extra_info))
        checksum = weights_checksum(self._live.tensors())
        colour = tuple(struct.pack(">I", checksum)[:3])
        images = [Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour) for _ in range(params.batch_size)]
        info = f"{params.prompt}\nSteps: {params.steps}, Seed: {params.seed}, checksum: {checksum:08x}"
        info += "".join(f", {key}: {value}" for key, value in extra_info.items() if key != "SuperMerger recipe")
        return Generated(images, info)

