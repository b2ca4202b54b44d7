"""supermerger: merge Stable Diffusion checkpoints key by key, as SuperMerger does.

Example:
    >>> from mergers import Recipe, merge_to_file
    >>> merge_to_file(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3), "ab.safetensors")
"""

from mergers.checkpoint import Checkpoint, open_checkpoint
from mergers.errors import MergeError
from mergers.merge import MergeResult, merge_stream, merge_to_file
from mergers.recipe import Recipe
from mergers.writer import save_checkpoint

__version__ = "0.1.0"

__all__ = ["Checkpoint", "MergeError", "MergeResult", "Recipe", "merge_stream", "merge_to_file",
           "open_checkpoint", "save_checkpoint", "__version__"]
