"""The peers bench/merge.py compares against, each run as its own process.

``naive``: a load-all merge as AUTOMATIC1111's built-in checkpoint merger does it
(every input loaded whole with safetensors, the formula applied key by key in the
models' dtype, the whole result saved at once). ``sd-mecha`` and ``sd-meh`` are the
PyPI packages, installed by bench/merge.py into bench/out/peers-venv (which reuses
this project's torch, so every row runs the same torch).

Example:
    python bench/peers.py naive weight_sum 0.5 out.safetensors a.safetensors b.safetensors
    bench/out/peers-venv/bin/python bench/peers.py sd-mecha add_difference 0.5 out.safetensors a b c
"""

from __future__ import annotations

import sys
from pathlib import Path


def naive(mode: str, alpha: float, output: Path, inputs: list[Path]) -> None:
    """Load every input whole, merge key by key in their dtype, save the whole result."""
    import safetensors.torch

    a, b, *rest = [safetensors.torch.load_file(path) for path in inputs]
    if mode == "add_difference":
        (c,) = rest
        for key in b:  # B − C first, as the web UI's merger does, then A + α·(B − C)
            if key in c and "model" in key:
                b[key] = b[key] - c[key]
        del c
    for key in a:
        if "model" in key and key in b and a[key].shape == b[key].shape:
            a[key] = a[key] + alpha * b[key] if mode == "add_difference" else (1 - alpha) * a[key] + alpha * b[key]
    del b
    safetensors.torch.save_file(a, output)


def naive_durable(mode: str, alpha: float, output: Path, inputs: list[Path]) -> None:
    """``naive``, then fsync the output: on disk when the process ends, as supermerger's save is
    (the others return while the file may still sit in the page cache)."""
    import os

    naive(mode, alpha, output, inputs)
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sd_mecha(mode: str, alpha: float, output: Path, inputs: list[Path]) -> None:
    """sd-mecha's weighted_sum / add_difference, fp16 out (its default merge dtype, fp32)."""
    import sd_mecha
    import torch

    models = [sd_mecha.model(path) for path in inputs]
    if mode == "add_difference":
        recipe = sd_mecha.add_difference(*models, alpha=alpha)
    else:
        recipe = sd_mecha.weighted_sum(*models, alpha=alpha)
    sd_mecha.merge(recipe, output=output, output_dtype=torch.float16)


def sd_meh(mode: str, alpha: float, output: Path, inputs: list[Path]) -> None:
    """sd-meh's merge_models (fp16 precision) and save_model."""
    from sd_meh.merge import NUM_TOTAL_BLOCKS, merge_models, save_model

    names = ["model_a", "model_b", "model_c"][: len(inputs)]
    merge_mode = {"weight_sum": "weighted_sum"}.get(mode, mode)  # its name for the same formula
    merged = merge_models(dict(zip(names, map(str, inputs))), weights={"alpha": [alpha] * NUM_TOTAL_BLOCKS},
                          bases={"alpha": alpha}, merge_mode=merge_mode, precision=16)
    save_model(merged, str(output.with_suffix("")), "safetensors")  # it appends ".safetensors"


PEERS = {"naive": naive, "naive-fsync": naive_durable, "sd-mecha": sd_mecha, "sd-meh": sd_meh}


def main(argv: list[str]) -> int:
    peer, mode, alpha, output, *inputs = argv
    PEERS[peer](mode, float(alpha), Path(output), [Path(p) for p in inputs])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
