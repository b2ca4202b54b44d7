"""Model architectures: key lists of real checkpoints, detection, and key -> block assignment."""

from mergers.arch.blocks import SDXL_FINE_BLOCKS, block_of, fine_block_of_sdxl
from mergers.arch.detect import Architecture, detect_architecture, require_supported
from mergers.arch.keys import KeySpec, key_specs
from mergers.arch.layouts import LAYOUTS, SD1_BLOCKS, SDXL_BLOCKS, block_ids

__all__ = [
    "LAYOUTS",
    "SD1_BLOCKS",
    "SDXL_BLOCKS",
    "SDXL_FINE_BLOCKS",
    "Architecture",
    "KeySpec",
    "block_ids",
    "block_of",
    "detect_architecture",
    "fine_block_of_sdxl",
    "key_specs",
    "require_supported",
]
