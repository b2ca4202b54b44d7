"""Stand-in for modules/sd_hijack.py: the hijack that renames the text encoder's modules.

While it is applied, ``cond_stage_model.transformer.text_model.embeddings.token_embedding.weight``
is named ``cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight``.
"""

import torch

from modules import sd_hijack_clip


class EmbeddingsWithFixes(torch.nn.Module):
    """Wraps the token embedding to splice in textual-inversion vectors."""

    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []

    def hijack(self, m):
        """SD1 branch of A1111's hijack: wrap the token embedding, then the whole text encoder."""
        model_embeddings = m.cond_stage_model.transformer.text_model.embeddings
        model_embeddings.token_embedding = EmbeddingsWithFixes(model_embeddings.token_embedding, self)
        m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model
        self.layers = list(m.modules())

    def undo_hijack(self, m):
        if type(m.cond_stage_model) == sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords:
            m.cond_stage_model = m.cond_stage_model.wrapped
            model_embeddings = m.cond_stage_model.transformer.text_model.embeddings
            if type(model_embeddings.token_embedding) == EmbeddingsWithFixes:
                model_embeddings.token_embedding = model_embeddings.token_embedding.wrapped
        self.layers = None
        self.clip = None

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
