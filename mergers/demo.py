"""Small demo models with the real SD1.5 key names, for a first merge on any machine.

Every key of a real SD1.5 checkpoint is there with its dtype and number of
dimensions, but each dimension is scaled down (a few MB in all), so the demo
and the tests exercise the real key layout without 2 GB downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergers.arch import key_specs
from mergers.writer import save_checkpoint

DEMO_DIR = Path("demo")
DEMO_MODELS = ("demo_a.safetensors", "demo_b.safetensors", "demo_c.safetensors")

# Channel counts up to 9 (latent 4, inpainting 9, pix2pix 8) and 3x3 kernels keep
# their size, so architecture and inpainting rules see what they see in real files.
KEEP_DIMS_UP_TO = 9


def scaled_shape(shape: tuple[int, ...], key: str) -> tuple[int, ...]:
    """A small shape with the same rank; position ids keep their 77 entries.

    Example:
        >>> scaled_shape((320, 4, 3, 3), "model.diffusion_model.input_blocks.0.0.weight")
        (10, 4, 3, 3)
    """
    if key.endswith("position_ids"):
        return tuple(shape)
    return tuple(n if n <= KEEP_DIMS_UP_TO else max(KEEP_DIMS_UP_TO + 1, n // 32) for n in shape)


def tiny_state_dict(family: str = "sd1", *, seed: int = 0, dtype: torch.dtype = torch.float16,
                    in_channels: int = 4, optional: bool = False) -> dict[str, torch.Tensor]:
    """A random state dict with every required key of ``family`` at scaled-down shapes.

    Example:
        >>> sd = tiny_state_dict("sdxl", seed=1)
        >>> sd["model.diffusion_model.input_blocks.0.0.weight"].shape
        torch.Size([10, 4, 3, 3])
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in key_specs(family):
        if spec.optional and not optional:
            continue
        shape = scaled_shape(spec.shape, spec.key)
        if spec.key == "model.diffusion_model.input_blocks.0.0.weight":
            shape = (shape[0], in_channels, *shape[2:])
        tensors[spec.key] = _random_tensor(spec.key, shape, spec.dtype, dtype, generator)
    return tensors


def _random_tensor(key: str, shape, stored: str, dtype: torch.dtype, generator) -> torch.Tensor:
    if stored.startswith("int"):
        if not shape:
            return torch.zeros((), dtype=getattr(torch, stored))
        return torch.arange(shape[-1], dtype=getattr(torch, stored)).expand(shape).clone()
    return torch.randn(shape, generator=generator).to(dtype)


def ensure_demo_models(folder: Path = DEMO_DIR) -> list[Path]:
    """Write the three demo models into ``folder`` unless they are there already.

    Example:
        >>> ensure_demo_models(Path("demo"))
        [PosixPath('demo/demo_a.safetensors'), ...]
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in DEMO_MODELS]
    for seed, path in enumerate(paths):
        if not path.exists():
            save_checkpoint(path, tiny_state_dict("sd1", seed=seed, optional=True),
                            metadata={"modelspec.title": f"supermerger demo {path.stem}"})
    return paths
