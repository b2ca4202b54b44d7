"""Key lists of the diffusion models released after SDXL, built from their published configurations.

Each generator returns ``{key: shape}`` for the diffusion model alone, with bare keys as ComfyUI and the
makers ship them. Block counts and the key names that detection and block assignment read are the
models' own (ComfyUI ``comfy/model_detection.py`` and the models' configs); the other names are a
representative subset of each block, and shapes are tiny (4 × 4) except where detection reads them.
:func:`lumina2_full` is the one full-size list (real widths), for the peak-memory benchmark.

Example:
    >>> len([k for k in ARCH_KEYS["qwen_image"]() if k.endswith(".attn.to_q.weight")])
    60
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mergers.arch import key_specs

TINY = (4, 4)
Shapes = dict[str, tuple[int, ...]]


def repeated(prefix: str, count: int, names: Iterable[str], shape=TINY, start: int = 0) -> Shapes:
    """``prefix.N.name`` for N in start…count-1."""
    names = tuple(names)
    return {f"{prefix}.{n}.{name}": shape for n in range(start, count) for name in names}


def plain(*names: str, shape=TINY) -> Shapes:
    return dict.fromkeys(names, shape)


def chroma() -> Shapes:
    """Chroma: Flux's 19 double and 38 single blocks, no guidance_in/vector_in; a distilled guidance layer."""
    double = ("img_attn.qkv.weight", "img_attn.norm.key_norm.scale", "img_attn.norm.query_norm.scale",
              "img_attn.proj.weight", "img_mlp.0.weight", "img_mlp.2.weight", "txt_attn.qkv.weight", "txt_mlp.0.weight")
    return (plain("img_in.weight", "img_in.bias", "txt_in.weight", "txt_in.bias", "final_layer.linear.weight",
                  "distilled_guidance_layer.in_proj.weight", "distilled_guidance_layer.out_proj.weight")
            | repeated("distilled_guidance_layer.layers", 5, ("in_layer.weight", "in_layer.bias", "out_layer.weight"))
            | repeated("distilled_guidance_layer.norms", 5, ("scale",), shape=(4,))
            | repeated("double_blocks", 19, double)
            | repeated("single_blocks", 38, ("linear1.weight", "linear2.weight", "norm.key_norm.scale")))


def qwen_image() -> Shapes:
    """Qwen-Image: 60 dual-stream blocks; txt_norm over Qwen2.5-VL's 3584-wide states."""
    block = ("img_mod.1.weight", "txt_mod.1.weight", "attn.to_q.weight", "attn.to_k.weight", "attn.add_q_proj.weight",
             "attn.to_out.0.weight", "attn.to_add_out.weight", "attn.norm_q.weight", "img_mlp.net.0.proj.weight",
             "img_mlp.net.2.weight", "txt_mlp.net.0.proj.weight")
    return (plain("img_in.weight", "txt_in.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                  "time_text_embed.timestep_embedder.linear_2.weight", "norm_out.linear.weight", "proj_out.weight")
            | plain("txt_norm.weight", shape=(3584,))
            | repeated("transformer_blocks", 60, block))


def hidream() -> Shapes:
    """HiDream-I1: 16 double-stream and 32 single-stream blocks with mixture-of-experts feed-forwards."""
    double = ("block.adaLN_modulation.1.weight", "block.attn1.to_q.weight", "block.attn1.to_q_t.weight",
              "block.ff_i.shared_experts.w1.weight", "block.ff_i.shared_experts.w3.weight", "block.ff_i.experts.0.w1.weight",
              "block.ff_i.gate.weight", "block.ff_t.w1.weight")
    single = ("block.adaLN_modulation.1.weight", "block.attn1.to_q.weight", "block.ff_i.shared_experts.w1.weight",
              "block.ff_i.gate.weight")
    return (plain("x_embedder.proj.weight", "t_embedder.timestep_embedder.linear_1.weight",
                  "p_embedder.pooled_embedder.linear_1.weight", "final_layer.linear.weight",
                  "final_layer.adaLN_modulation.1.weight")
            | repeated("caption_projection", 49, ("linear.weight",))
            | repeated("double_stream_blocks", 16, double) | repeated("single_stream_blocks", 32, single))


def _nextdit(layers: int, dim: int, cap_dim: int) -> Shapes:
    """Lumina 2 / Z-Image (NextDiT): 2 noise refiners, 2 context refiners, then the main layers."""
    block = ("attention.qkv.weight", "attention.out.weight", "attention.q_norm.weight", "attention.k_norm.weight",
             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm1.weight",
             "ffn_norm1.weight", "adaLN_modulation.1.weight")
    return (plain("x_embedder.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "cap_embedder.0.weight",
                  "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight", "norm_final.weight")
            | plain("cap_embedder.1.weight", shape=(dim, cap_dim))
            | repeated("noise_refiner", 2, block) | repeated("context_refiner", 2, block[:-1])
            | repeated("layers", layers, block))


def lumina2() -> Shapes:
    return _nextdit(26, 2304, 2304)


def z_image() -> Shapes:
    return _nextdit(30, 3840, 2560)


def _wan(blocks: int, dim: int) -> Shapes:
    block = ("self_attn.q.weight", "self_attn.k.weight", "self_attn.o.weight", "self_attn.norm_q.weight",
             "cross_attn.q.weight", "ffn.0.weight", "ffn.2.weight", "norm3.weight")
    return (plain("text_embedding.0.weight", "text_embedding.2.weight", "time_embedding.0.weight",
                  "time_embedding.2.weight", "time_projection.1.weight", "head.head.weight")
            | plain("patch_embedding.weight", shape=(dim, 16, 1, 2, 2)) | plain("head.modulation", shape=(1, 2, dim))
            | repeated("blocks", blocks, block) | repeated("blocks", blocks, ("modulation",), shape=(1, 6, dim)))


def wan() -> Shapes:
    """Wan 2.1/2.2 14B: 40 blocks, width 5120."""
    return _wan(40, 5120)


def wan_small() -> Shapes:
    """Wan 2.1 1.3B: 30 blocks, width 1536."""
    return _wan(30, 1536)


def auraflow() -> Shapes:
    """AuraFlow: 4 double (MMDiT) layers and 32 single layers."""
    double = ("attn.w1q.weight", "attn.w1k.weight", "attn.w2q.weight", "mlpX.c_fc1.weight", "mlpC.c_fc1.weight",
              "modX.1.weight", "modC.1.weight")
    return (plain("init_x_linear.weight", "positional_encoding", "cond_seq_linear.weight", "register_tokens",
                  "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "final_linear.weight", "modF.1.weight")
            | repeated("double_layers", 4, double)
            | repeated("single_layers", 32, ("attn.w1q.weight", "mlp.c_fc1.weight", "modCX.1.weight")))


def hunyuan_dit() -> Shapes:
    """Hunyuan-DiT: 40 blocks; blocks 21-39 take a skip connection (skip_linear)."""
    block = ("attn1.Wqkv.weight", "attn1.out_proj.weight", "attn2.q_proj.weight", "attn2.kv_proj.weight",
             "mlp.fc1.weight", "mlp.fc2.weight", "norm1.weight", "default_modulation.1.weight")
    return (plain("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "extra_embedder.0.weight", "mlp_t5.0.weight",
                  "mlp_t5.2.weight", "pooler.q_proj.weight", "style_embedder.weight", "text_embedding_padding",
                  "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight")
            | repeated("blocks", 40, block) | repeated("blocks", 40, ("skip_linear.weight",), start=21))


def pixart() -> Shapes:
    """PixArt-Σ: 28 blocks with adaLN-single (t_block) conditioning."""
    block = ("attn.qkv.weight", "attn.proj.weight", "cross_attn.q_linear.weight", "cross_attn.kv_linear.weight",
             "cross_attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "scale_shift_table")
    return (plain("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "t_block.1.weight",
                  "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.weight", "y_embedder.y_embedding",
                  "final_layer.linear.weight", "final_layer.scale_shift_table")
            | repeated("blocks", 28, block))


def kolors() -> Shapes:
    """Kolors: SDXL's U-Net (real key list) with ChatGLM3's 4096-wide context projected by encoder_hid_proj."""
    unet = {s.key: s.shape for s in key_specs("sdxl") if s.key.startswith("model.diffusion_model.")}
    return unet | {"model.diffusion_model.encoder_hid_proj.weight": (2048, 4096),
                   "model.diffusion_model.label_emb.0.0.weight": (1280, 5632)}


def stable_cascade_c() -> Shapes:
    """Stable Cascade stage C: levels of 8 and 24 (Res, Attention, Timestep) groups down, 24 and 8 up."""
    group = ("channelwise.0.weight", "depthwise.weight", "attention.attn.in_proj_weight", "mapper.weight")
    return (plain("clf.1.weight", "clip_txt_mapper.weight", "clip_txt_pooled_mapper.weight", "clip_img_mapper.weight",
                  "clip_norm.weight", "embedding.1.weight", "down_downscalers.1.1.blocks.0.weight",
                  "up_upscalers.0.1.blocks.1.weight")
            | repeated("down_blocks.0", 24, group) | repeated("down_blocks.1", 72, group)
            | repeated("up_blocks.0", 72, group) | repeated("up_blocks.1", 24, group))


def stable_cascade_b() -> Shapes:
    """Stable Cascade stage B: four levels down and up."""
    return (plain("clf.1.weight", "clip_mapper.weight", "effnet_mapper.0.weight", "pixels_mapper.0.weight",
                  "embedding.1.weight")
            | repeated("down_blocks", 4, ("0.depthwise.weight", "0.channelwise.0.weight"))
            | repeated("up_blocks", 4, ("0.depthwise.weight", "0.channelwise.0.weight"))
            | repeated("down_downscalers", 4, ("1.weight",), start=1))


def _mmdit(blocks: int, x_attn2: int = 0) -> Shapes:
    block = ("x_block.attn.qkv.weight", "x_block.mlp.fc1.weight", "context_block.attn.qkv.weight",
             "context_block.adaLN_modulation.1.weight")
    return (plain("x_embedder.proj.weight", "context_embedder.weight", "t_embedder.mlp.0.weight",
                  "y_embedder.mlp.0.weight", "pos_embed", "final_layer.linear.weight")
            | repeated("joint_blocks", blocks, block) | repeated("joint_blocks", x_attn2, ("x_block.attn2.qkv.weight",)))


def sd35_medium() -> Shapes:
    """SD3.5 Medium (MMDiT-X): 24 joint blocks, the first 13 with a second self-attention."""
    return _mmdit(24, 13)


def sd35_large() -> Shapes:
    """SD3.5 Large: 38 joint blocks."""
    return _mmdit(38)


ARCH_KEYS: dict[str, Callable[[], Shapes]] = {
    "chroma": chroma, "qwen_image": qwen_image, "hidream": hidream, "lumina2": lumina2, "z_image": z_image,
    "wan": wan, "wan_small": wan_small, "auraflow": auraflow, "hunyuan_dit": hunyuan_dit, "pixart": pixart,
    "kolors": kolors, "stable_cascade_c": stable_cascade_c, "stable_cascade_b": stable_cascade_b,
    "sd35_medium": sd35_medium, "sd35_large": sd35_large,
}


def lumina2_full() -> Shapes:
    """Every weight of Lumina-Image 2.0's NextDiT at full width (2.6B parameters; 5.2 GB in bf16).

    dim 2304, 24 query and 8 key/value heads of 96, feed-forward 8960 (SwiGLU), adaLN from a 1024-wide
    time embedding, Gemma-2-2B captions (2304), 2 noise refiners, 2 context refiners (no adaLN), 26 layers.
    """
    dim, head, ffn, t_dim = 2304, 96, 8960, 1024
    qkv = (24 + 2 * 8) * head
    block = {"attention.qkv.weight": (qkv, dim), "attention.out.weight": (dim, dim), "attention.q_norm.weight": (head,),
             "attention.k_norm.weight": (head,), "feed_forward.w1.weight": (ffn, dim), "feed_forward.w2.weight": (dim, ffn),
             "feed_forward.w3.weight": (ffn, dim), "attention_norm1.weight": (dim,), "ffn_norm1.weight": (dim,),
             "attention_norm2.weight": (dim,), "ffn_norm2.weight": (dim,)}
    modulation = {"adaLN_modulation.1.weight": (4 * dim, t_dim), "adaLN_modulation.1.bias": (4 * dim,)}
    shapes: Shapes = {"x_embedder.weight": (dim, 64), "x_embedder.bias": (dim,), "x_pad_token": (1, dim),
                      "cap_pad_token": (1, dim), "t_embedder.mlp.0.weight": (t_dim, 256), "t_embedder.mlp.0.bias": (t_dim,),
                      "t_embedder.mlp.2.weight": (t_dim, t_dim), "t_embedder.mlp.2.bias": (t_dim,),
                      "cap_embedder.0.weight": (dim,), "cap_embedder.1.weight": (dim, dim), "cap_embedder.1.bias": (dim,)}
    for prefix, count, blocks in (("noise_refiner", 2, block | modulation), ("context_refiner", 2, block),
                                  ("layers", 26, block | modulation)):
        shapes |= {f"{prefix}.{n}.{name}": shape for n in range(count) for name, shape in blocks.items()}
    return shapes | {"norm_final.weight": (dim,), "final_layer.linear.weight": (64, dim), "final_layer.linear.bias": (64,),
                     "final_layer.adaLN_modulation.1.weight": (dim, t_dim), "final_layer.adaLN_modulation.1.bias": (dim,)}


def wan_full() -> Shapes:
    """Every weight of Wan 2.1/2.2 T2V 14B at full width (14.3B parameters; 14.3 GB in fp8).

    dim 5120, 40 heads, feed-forward 13824, 40 blocks, umT5 text (4096), 256-wide time frequencies,
    16 latent channels in and out, patch (1, 2, 2); the text-to-video model (no image embedder).
    """
    dim, ffn = 5120, 13824
    linear = {"weight": (dim, dim), "bias": (dim,)}
    block: Shapes = {f"{attn}.{proj}.{part}": shape for attn in ("self_attn", "cross_attn")
                     for proj in "qkvo" for part, shape in linear.items()}
    block |= {f"{attn}.{norm}.weight": (dim,) for attn in ("self_attn", "cross_attn") for norm in ("norm_q", "norm_k")}
    block |= {"norm3.weight": (dim,), "norm3.bias": (dim,), "ffn.0.weight": (ffn, dim), "ffn.0.bias": (ffn,),
              "ffn.2.weight": (dim, ffn), "ffn.2.bias": (dim,), "modulation": (1, 6, dim)}
    shapes: Shapes = {"patch_embedding.weight": (dim, 16, 1, 2, 2), "patch_embedding.bias": (dim,),
                      "text_embedding.0.weight": (dim, 4096), "text_embedding.0.bias": (dim,),
                      "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
                      "time_embedding.0.weight": (dim, 256), "time_embedding.0.bias": (dim,),
                      "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
                      "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,)}
    shapes |= {f"blocks.{n}.{name}": shape for n in range(40) for name, shape in block.items()}
    return shapes | {"head.head.weight": (64, dim), "head.head.bias": (64,), "head.modulation": (1, 2, dim)}
