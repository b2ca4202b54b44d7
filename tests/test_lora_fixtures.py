"""Tiny LoRA files with known low-rank changes, for the LoRA tests (and tests of the builders themselves).

``make_lora`` writes a LoRA for a tiny real-layout checkpoint (``mergers.demo.tiny_state_dict``): every
module in kohya's own spelling (SD1/SD2: diffusers U-Net names; SDXL: LDM names, ``lora_te1_/te2_``),
as LoRA (up/down + alpha), LoHa or LoKr, and returns the tensors it wrote so tests can compute the
expected ΔW themselves.

Example:
    >>> tensors = make_lora(tmp_path / "x.safetensors", "sd1", rank=2, seed=1)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergers.demo import tiny_state_dict
from mergers.lora.keys import Target, lora_names, module_table
from mergers.writer import save_checkpoint

ATTENTION = ("attn1", "attn2", "self_attn", "attn_in_proj")


def tiny_checkpoint(path: Path, family: str, *, seed: int = 0, dtype=torch.float32, in_channels: int = 4) -> Path:
    """A tiny real-key checkpoint of ``family`` at ``path``."""
    save_checkpoint(path, tiny_state_dict(family, seed=seed, dtype=dtype, in_channels=in_channels))
    return path


def kohya_name(key: str, family: str, part: int | None) -> str:
    """The name kohya's trainer gives the module of ``key`` (diffusers U-Net names for SD1/SD2)."""
    names = [name for name, p in lora_names(key) if p == part]
    if key.startswith("model.diffusion_model.") and family in ("sd1", "sd2") and len(names) > 1:
        return names[1]
    return names[0]


def lora_targets(family: str, *, convs: bool = True) -> dict[str, Target]:
    """kohya name → target for every LoRA-able layer of a tiny ``family`` checkpoint (3x3 convs if ``convs``)."""
    shapes = {k: tuple(v.shape) for k, v in tiny_state_dict(family).items()}
    table = module_table(shapes)
    chosen = {}
    for target in {(t.key, t.part): t for t in table.values()}.values():
        if "embedding" in target.key or "position" in target.key:
            continue  # token/position embeddings: no LoRA trains them
        if not convs and len(target.shape) == 4 and target.shape[2:] != (1, 1):
            continue
        chosen[kohya_name(target.key, family, target.part)] = target
    return chosen


def make_lora(path: Path, family: str, *, rank: int = 2, alpha: float | None = 1.0, seed: int = 0,
              kind: str = "lora", convs: bool = True, only: str | None = None) -> dict[str, torch.Tensor]:
    """Write a LoRA of ``kind`` ("lora", "loha", "lokr") for every (or ``only``-matching) module; return its tensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, target in lora_targets(family, convs=convs).items():
        if only is not None and only not in name:
            continue
        shape = target.delta_shape
        tensors.update(BUILDERS[kind](name, shape, rank, generator))
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_checkpoint(path, tensors, metadata={"ss_network_dim": str(rank), "ss_output_name": path.stem})
    return tensors


def _lora_parts(name, shape, rank, generator):
    down = torch.randn(rank, shape[1], *shape[2:], generator=generator)
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}


def _loha_parts(name, shape, rank, generator):
    inner = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    return {f"{name}.hada_w1_a": torch.randn(shape[0], rank, generator=generator),
            f"{name}.hada_w1_b": torch.randn(rank, inner, generator=generator),
            f"{name}.hada_w2_a": torch.randn(shape[0], rank, generator=generator),
            f"{name}.hada_w2_b": torch.randn(rank, inner, generator=generator)}


def _lokr_parts(name, shape, rank, generator):
    """w1 (2 x 1) full, w2 low-rank: kron gives (2·a, b) = the target's rows and flattened columns."""
    inner = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    return {f"{name}.lokr_w1": torch.randn(2, 1, generator=generator),
            f"{name}.lokr_w2_a": torch.randn(shape[0] // 2, rank, generator=generator),
            f"{name}.lokr_w2_b": torch.randn(rank, inner, generator=generator)}


BUILDERS = {"lora": _lora_parts, "loha": _loha_parts, "lokr": _lokr_parts}


def expected_delta(tensors: dict[str, torch.Tensor], name: str, kind: str = "lora") -> torch.Tensor:
    """ΔW · alpha/rank computed here, independently of the library (flattened to 2-D)."""
    alpha = tensors.get(f"{name}.alpha")
    if kind == "lora":
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        rank, delta = down.shape[0], up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    elif kind == "loha":
        t = {p: tensors[f"{name}.hada_{p}"] for p in ("w1_a", "w1_b", "w2_a", "w2_b")}
        rank, delta = t["w1_b"].shape[0], (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
    else:
        w2 = tensors[f"{name}.lokr_w2_a"] @ tensors[f"{name}.lokr_w2_b"]
        rank, delta = tensors[f"{name}.lokr_w2_b"].shape[0], torch.kron(tensors[f"{name}.lokr_w1"], w2)
    return delta * (float(alpha) / rank if alpha is not None else 1.0)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_attention_layer_of_the_tiny_models_gets_a_module(family):
    targets = lora_targets(family)
    keys = {t.key for t in targets.values()}
    assert any(".attn2.to_k." in k for k in keys) and any("mlp" in k or "fc1" in k for k in keys)
    assert all(name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for name in targets)


def test_the_builder_writes_what_it_returns(tmp_path):
    from mergers.checkpoint import open_checkpoint

    tensors = make_lora(tmp_path / "x.safetensors", "sd1", rank=3)
    with open_checkpoint(tmp_path / "x.safetensors") as written:
        assert set(written) == set(tensors)
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        assert torch.equal(written[f"{name}.lora_down.weight"], tensors[f"{name}.lora_down.weight"])
