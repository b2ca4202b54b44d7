"""Model architectures as data: layouts and detection rules in JSON files (shipped and the user's), real key
lists, detection, key -> block assignment, and automatic layouts for models no file describes."""

from mergers.arch.auto import auto_layout_name, key_fingerprint
from mergers.arch.blocks import SDXL_FINE_BLOCKS, block_of, fine_block_of, fine_block_of_sdxl, merges_by_name
from mergers.arch.detect import Architecture, detect_architecture, require_supported
from mergers.arch.keys import KeySpec, key_specs
from mergers.arch.layouts import FLUX_BLOCKS, LAYOUTS, SD1_BLOCKS, SD3_BLOCKS, SD3_LARGE_BLOCKS, SDXL_BLOCKS, block_ids
from mergers.arch.registry import layout_named, registry, user_layouts_dir
from mergers.arch.spec import Layout, LayoutFileError

__all__ = [
    "FLUX_BLOCKS",
    "LAYOUTS",
    "SD1_BLOCKS",
    "SD3_BLOCKS",
    "SD3_LARGE_BLOCKS",
    "SDXL_BLOCKS",
    "SDXL_FINE_BLOCKS",
    "Architecture",
    "KeySpec",
    "Layout",
    "LayoutFileError",
    "auto_layout_name",
    "block_ids",
    "block_of",
    "detect_architecture",
    "fine_block_of",
    "fine_block_of_sdxl",
    "key_fingerprint",
    "key_specs",
    "layout_named",
    "merges_by_name",
    "registry",
    "require_supported",
    "user_layouts_dir",
]
