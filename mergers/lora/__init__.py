"""LoRA tools: read kohya/LyCORIS/diffusers LoRA files, add them into a checkpoint, merge them, extract one.

Example:
    >>> from mergers.lora import extract_lora, loras_to_checkpoint, merge_loras, parse_entry
    >>> loras_to_checkpoint("sd15.safetensors", [parse_entry("style.safetensors:0.8:OUTALL")], "out.safetensors")
    >>> merge_loras([parse_entry("a.safetensors:0.7"), parse_entry("b.safetensors:0.5")], "ab.safetensors")
    >>> extract_lora("tuned.safetensors", "sd15.safetensors", "diff.safetensors", rank=64)
"""

from mergers.lora.apply import loras_to_checkpoint, plan_contributions, stream_with_loras
from mergers.lora.blocks import LoraEntry, parse_entries, parse_entry
from mergers.lora.extract import extract_lora
from mergers.lora.formats import LoraFile, open_lora
from mergers.lora.merge import LoraMergeResult, merge_loras

__all__ = [
    "LoraEntry",
    "LoraFile",
    "LoraMergeResult",
    "extract_lora",
    "loras_to_checkpoint",
    "merge_loras",
    "open_lora",
    "parse_entries",
    "parse_entry",
    "plan_contributions",
    "stream_with_loras",
]
