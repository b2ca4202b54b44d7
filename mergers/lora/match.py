"""Matching a LoRA's modules to a checkpoint's keys, and telling which architecture a LoRA is for.

A module fits when the checkpoint has its key and its change has the key's number of elements (a
linear LoRA on SD1's 1x1-conv ``proj_in`` fits); a LoRA on an inpainting model's 9-channel input conv
fits with the extra channels left unchanged, as the original pads them. Anything else is an error that
names the LoRA, the module, and the architecture the LoRA looks made for.

Example:
    >>> fits = match_modules(lora, module_table(ckpt.shapes), where="model.safetensors (SD1.x)")
    >>> lora_family(lora)
    'sd1'
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from mergers.arch import key_specs
from mergers.arch.detect import FAMILY_LABELS
from mergers.errors import ArchitectureError
from mergers.lora.formats import LoraFile, LoraModule
from mergers.lora.keys import Target, module_table

FAMILIES = ("sd1", "sd2", "sdxl")  # ties go to the first: SD1 and SD2 LoRAs share every module name
EXAMPLES_IN_ERRORS = 3


@functools.cache
def reference_table(family: str) -> dict[str, Target]:
    """The module table of a real, full-size ``family`` checkpoint (from ``mergers/arch/data``)."""
    return module_table({spec.key: spec.shape for spec in key_specs(family)})


def lora_family(lora: LoraFile) -> str:
    """"sd1", "sd2" or "sdxl": the family whose module names hold every module, then the most shapes.

    Example:
        >>> lora_family(open_lora("sdxl_style.safetensors"))
        'sdxl'
    """
    scores = {family: _fit_counts(lora, reference_table(family)) for family in FAMILIES}
    best = max(FAMILIES, key=lambda family: scores[family])
    if scores[best][0] < len(lora.modules):
        missing = [name for name in lora.modules if name not in reference_table(best)]
        raise ArchitectureError(f"{lora.name}: {_count(missing, 'module')} match no SD1, SD2 or SDXL layer "
                                f"(e.g. {', '.join(missing[:EXAMPLES_IN_ERRORS])})")
    return best


def family_label(family: str) -> str:
    return FAMILY_LABELS[family]


def _fit_counts(lora: LoraFile, table: Mapping[str, Target]) -> tuple[int, int]:
    named = [name for name in lora.modules if name in table]
    shaped = sum(1 for name in named if fit_problem(lora, lora.modules[name], table[name]) is None)
    return len(named), shaped


def match_modules(lora: LoraFile, table: Mapping[str, Target], *, where: str,
                  check_shapes: bool = True) -> dict[str, Target]:
    """Each module of ``lora`` → the checkpoint tensor it changes; ArchitectureError if any does not fit.

    ``where`` names the checkpoint (and its architecture) in the error. Without ``check_shapes`` only
    the names must match (to find each module's block in a reference layout).
    """
    problems = {}
    for name, module in lora.modules.items():
        target = table.get(name)
        if target is None:
            problems[name] = "not in it"
        else:
            problems[name] = fit_problem(lora, module, target) if check_shapes else None
    bad = {name: why for name, why in problems.items() if why is not None}
    if bad:
        raise ArchitectureError(_misfit_message(lora, bad, where))
    return {name: table[name] for name in lora.modules}


def fit_problem(lora: LoraFile, module: LoraModule, target: Target) -> str | None:
    """Why the module's change cannot be added to ``target`` (None: it can)."""
    shape = module.delta_shape(lora.shapes)
    wanted = target.delta_shape
    if math.prod(shape) == math.prod(wanted) or _pads_channels(shape, wanted):
        return None
    return f"changes {list(shape)}, the key {target.key} is {list(wanted)}"


def fit_delta(delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``delta`` in ``shape``: reshaped, or zero-padded on input channels (inpainting's 9-channel conv_in)."""
    if delta.numel() == math.prod(shape):
        return delta.reshape(shape)
    padding = shape[1] - delta.shape[1]
    return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, padding))


def _pads_channels(shape: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    return (len(shape) == len(wanted) == 4 and shape[0] == wanted[0] and shape[2:] == wanted[2:]
            and shape[1] < wanted[1])


def _misfit_message(lora: LoraFile, bad: Mapping[str, str], where: str) -> str:
    examples = "; ".join(f"{name} {why}" for name, why in list(bad.items())[:EXAMPLES_IN_ERRORS])
    try:
        made_for = f"; the LoRA looks made for {family_label(lora_family(lora))}"
    except ArchitectureError:
        made_for = ""
    return (f"{lora.name}: {len(bad)} of {_count(lora.modules, 'module')} do not fit {where} "
            f"(e.g. {examples}){made_for}")


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
