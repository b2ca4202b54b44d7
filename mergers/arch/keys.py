"""Every key of a real SD1.x, SD2.x, SDXL, SD3 and Flux checkpoint, with its shape, dtype and component.

The lists live in ``mergers/arch/data/<family>.tsv``, one key a line, in the order of
``shared/arch/<family>.json`` (from sd-mecha's ``sd1-ldm``/``sdxl-sgm``/``sd3-comfyui``/``flux-flux``
configs and the Stability AI SD2 config). Flux's diffusion keys carry their bare spelling
(``double_blocks.0…``, as Black Forest Labs ship the transformer alone) as an alias. Columns: key, shape (``320,4,3,3``; empty for a scalar), dtype, component, optional (0/1),
aliases (older spellings of the key, comma-separated).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from mergers.errors import ArchitectureError

FAMILIES_WITH_KEYS = ("sd1", "sd2", "sdxl", "sd3", "flux")


@dataclass(frozen=True)
class KeySpec:
    """One tensor of a real checkpoint: its name, shape, stored dtype and model component."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    component: str
    optional: bool = False
    aliases: tuple[str, ...] = ()


@functools.cache
def key_specs(family: str) -> tuple[KeySpec, ...]:
    """Every key of a real ``family`` checkpoint ("sd1", "sd2", "sdxl", "sd3" or "flux"), in file order.

    Optional keys (EMA copies, ``position_ids``, scheduler buffers) are flagged, not left out.

    Example:
        >>> key_specs("sd1")[0].key
        'cond_stage_model.transformer.text_model.embeddings.position_embedding.weight'
    """
    if family not in FAMILIES_WITH_KEYS:
        raise ArchitectureError(f"no key list for {family!r}; known: {', '.join(FAMILIES_WITH_KEYS)}")
    text = (resources.files(__package__) / "data" / f"{family}.tsv").read_text(encoding="utf-8")
    lines = text.splitlines()[1:]  # the first line is the column header
    return tuple(_parse_line(line) for line in lines if line)


def _parse_line(line: str) -> KeySpec:
    key, shape, dtype, component, optional, aliases = line.split("\t")
    return KeySpec(
        key=key,
        shape=tuple(int(n) for n in shape.split(",")) if shape else (),
        dtype=dtype,
        component=component,
        optional=optional == "1",
        aliases=tuple(aliases.split(",")) if aliases else (),
    )
