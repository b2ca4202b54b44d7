"""Model architectures (SD1.x, SD2.x, SDXL, SD3, Flux): real key lists, detection, key -> block assignment."""

from mergers.arch.blocks import SDXL_FINE_BLOCKS, block_of, fine_block_of_sdxl, merges_by_name
from mergers.arch.detect import Architecture, detect_architecture, require_supported
from mergers.arch.keys import KeySpec, key_specs
from mergers.arch.layouts import FLUX_BLOCKS, LAYOUTS, SD1_BLOCKS, SD3_BLOCKS, SDXL_BLOCKS, block_ids

__all__ = [
    "FLUX_BLOCKS",
    "LAYOUTS",
    "SD1_BLOCKS",
    "SD3_BLOCKS",
    "SDXL_BLOCKS",
    "SDXL_FINE_BLOCKS",
    "Architecture",
    "KeySpec",
    "block_ids",
    "block_of",
    "detect_architecture",
    "fine_block_of_sdxl",
    "key_specs",
    "merges_by_name",
    "require_supported",
]
