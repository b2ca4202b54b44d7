"""Stand-in for backend/diffusion_engine/base.py: ``ForgeObjects`` and ``ForgeDiffusionEngine`` (not a Module)."""


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    matched_guesses = []

    def __init__(self, estimated_config, huggingface_components):
        self.model_config = estimated_config
        self.is_inpaint = False
        self.forge_objects = None
        self.forge_objects_original = None
        self.forge_objects_after_applying_lora = None
        self.current_lora_hash = str([])
        self.fix_for_webui_backward_compatibility()

    def set_clip_skip(self, clip_skip):
        pass

    def fix_for_webui_backward_compatibility(self):
        self.tiling_enabled = False
        self.first_stage_model = None
        self.cond_stage_model = None
        self.use_distilled_cfg_scale = False
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False


class StableDiffusion(ForgeDiffusionEngine):
    pass


class StableDiffusionXL(ForgeDiffusionEngine):
    pass


class Flux(ForgeDiffusionEngine):
    pass
