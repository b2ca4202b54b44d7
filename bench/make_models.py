"""Write full-size synthetic checkpoints for benchmarks.

Each model has the real key names and shapes of an SD1.5 or SDXL checkpoint
(from ``mergers.arch.keys``), optional keys left out, floats stored as fp16,
filled with seeded random values. ``flux`` is the Flux.1 transformer alone, as
Black Forest Labs ship it (bare keys, no text encoders or VAE), stored as fp8
(e4m3fn) like the popular 12 GB fp8 files. Tensors are generated and written one at a
time, so memory stays small. A file that already exists with the expected size
is kept.

Example:
    python bench/make_models.py --arch sd1 sdxl --models a b c --dir bench/models
    python bench/make_models.py --arch flux --models a b      # 2 × 11.9 GB
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mergers.arch.keys import KeySpec, key_specs  # noqa: E402
from mergers.writer import SafetensorsWriter, TensorSpec, encode_header  # noqa: E402

SEEDS = {"a": 1, "b": 2, "c": 3}
FLOAT_DTYPE = torch.float16
FLOAT_DTYPES = {"flux": torch.float8_e4m3fn}  # else FLOAT_DTYPE
DIFFUSION_PREFIX = "model.diffusion_model."
DIFFUSION_ONLY = ("flux",)  # written with bare transformer keys, as their makers ship them
METADATA = {"format": "pt", "supermerger_bench": "synthetic"}


def model_path(directory: Path, arch: str, name: str) -> Path:
    """Where model ``name`` of ``arch`` lives, e.g. ``bench/models/sd1_a.safetensors``."""
    return directory / f"{arch}_{name}.safetensors"


def stored_dtype(spec: KeySpec, arch: str = "sd1") -> torch.dtype:
    """fp16 (fp8 for Flux) for float keys, the listed integer dtype otherwise."""
    if spec.dtype.startswith("float") or spec.dtype.startswith("bfloat"):
        return FLOAT_DTYPES.get(arch, FLOAT_DTYPE)
    return getattr(torch, spec.dtype)


def tensor_specs(arch: str) -> list[TensorSpec]:
    """The tensors a synthetic ``arch`` model holds: every non-optional key, in file order."""
    specs = [s for s in key_specs(arch) if not s.optional]
    if arch in DIFFUSION_ONLY:
        specs = [s for s in specs if s.key.startswith(DIFFUSION_PREFIX)]
        return [TensorSpec(s.key[len(DIFFUSION_PREFIX):], stored_dtype(s, arch), tuple(s.shape)) for s in specs]
    return [TensorSpec(s.key, stored_dtype(s, arch), tuple(s.shape)) for s in specs]


def expected_size(specs: list[TensorSpec]) -> int:
    """The byte size of the safetensors file these specs make."""
    return len(encode_header(specs, METADATA)) + sum(s.nbytes for s in specs)


def make_tensor(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    """Random normal values (scaled small) for floats; ``arange`` for integer buffers."""
    if spec.dtype.is_floating_point:
        values = torch.randn(spec.shape, generator=generator, dtype=torch.float32).mul_(0.02)
        return values.to(spec.dtype)
    count = torch.Size(spec.shape).numel()
    return torch.arange(count, dtype=spec.dtype).reshape(spec.shape)


def write_model(path: Path, specs: list[TensorSpec], seed: int) -> None:
    """Stream one seeded model to ``path``, tensor by tensor."""
    generator = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path, specs, metadata=METADATA, overwrite=True) as out:
        for spec in specs:
            out.write(spec.key, make_tensor(spec, generator))


def ensure_model(directory: Path, arch: str, name: str) -> Path:
    """Write model ``name`` of ``arch`` unless a file of the right size is already there."""
    path = model_path(directory, arch, name)
    specs = tensor_specs(arch)
    size = expected_size(specs)
    if path.is_file() and path.stat().st_size == size:
        print(f"{path}: exists, {size / 1e9:.2f} GB ({len(specs)} tensors)")
        return path
    start = time.perf_counter()
    write_model(path, specs, SEEDS[name])
    print(f"{path}: wrote {size / 1e9:.2f} GB ({len(specs)} tensors) in {time.perf_counter() - start:.0f} s")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sd2", "sdxl", "flux"])
    parser.add_argument("--models", nargs="+", default=["a", "b", "c"], choices=sorted(SEEDS))
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        for name in args.models:
            ensure_model(args.dir, arch, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
