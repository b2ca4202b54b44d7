"""Stand-in for modules/sd_hijack_clip.py: A1111's wrapper around the CLIP text encoder."""

import torch


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """Wraps ``cond_stage_model``: its parameters gain a ``wrapped.`` in their names."""

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
