"""LoRAs added into tiny real-layout checkpoints: W' = W + ratio · alpha/rank · ΔW, key by key."""

from __future__ import annotations

import json

import pytest
import torch

from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.errors import ArchitectureError
from mergers.lora.apply import RECIPE_KEY, loras_to_checkpoint
from mergers.lora.blocks import parse_entry
from mergers.lora.formats import open_lora
from mergers.lora.match import lora_family
from tests.test_lora_fixtures import expected_delta, lora_targets, make_lora, tiny_checkpoint

LORA_CLI = ("mergers.lora.cli",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny fp32 SD1 and SDXL checkpoints and LoRAs for them (written once)."""
    root = tmp_path_factory.mktemp("lora")
    made = {"root": root}
    for family in ("sd1", "sdxl"):
        made[family] = tiny_checkpoint(root / f"{family}.safetensors", family)
        made[f"{family}_lora"] = make_lora(root / f"{family}_lora.safetensors", family, rank=2, alpha=1.0, seed=1)
    made["sd1_loha"] = make_lora(root / "sd1_loha.safetensors", "sd1", kind="loha", rank=2, alpha=4.0, seed=2,
                                 only="attentions_1")
    made["sd1_lokr"] = make_lora(root / "sd1_lokr.safetensors", "sd1", kind="lokr", rank=2, alpha=None, seed=3,
                                 only="mlp")
    return made


def applied(files, family, entries, tmp_path, **options):
    out = tmp_path / "out.safetensors"
    result = loras_to_checkpoint(files[family], [parse_entry(e) for e in entries], out, **options)
    return result, out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_each_key_gets_w_plus_ratio_scale_up_down(files, family, tmp_path):
    result, out = applied(files, family, [f"{files['root'] / family}_lora.safetensors:0.7"], tmp_path)
    tensors = files[f"{family}_lora"]
    targets = lora_targets(family)
    assert result.changed == len({t.key for t in targets.values()})
    with open_checkpoint(files[family]) as base, open_checkpoint(out) as merged:
        assert list(merged) == list(base)
        for name, target in targets.items():
            before, after = base[target.key], merged[target.key]
            delta = 0.7 * expected_delta(tensors, name)  # expected_delta includes alpha 1 / rank 2
            if target.part is None:
                assert torch.allclose(after, before + delta.reshape(before.shape), atol=1e-5), name
            else:
                rows = before.shape[0] // 3
                span = slice(target.part * rows, (target.part + 1) * rows)
                assert torch.allclose(after[span], before[span] + delta.reshape(after[span].shape), atol=1e-5)
        untouched = "first_stage_model.decoder.conv_in.weight"
        assert torch.equal(base[untouched], merged[untouched])


@pytest.mark.parametrize("kind,scale", [("loha", 2.0), ("lokr", 1.0)])
def test_lycoris_changes_follow_their_formulas(files, kind, scale, tmp_path):
    result, out = applied(files, "sd1", [f"{files['root']}/sd1_{kind}.safetensors:1"], tmp_path)
    tensors = files[f"sd1_{kind}"]
    names = {k.rsplit(".", 1)[0] for k in tensors if not k.endswith(".alpha")}
    targets = lora_targets("sd1")
    with open_checkpoint(files["sd1"]) as base, open_checkpoint(out) as merged:
        for name in names:
            key = targets[name].key
            delta = expected_delta(tensors, name, kind)  # includes alpha/rank (LoHa: 4/2; LoKr: no alpha)
            assert torch.allclose(merged[key], base[key] + delta.reshape(base[key].shape), atol=1e-4), name
    assert result.changed == len(names)
    with open_lora(files["root"] / f"sd1_{kind}.safetensors") as lora:
        assert lora.kind == {"loha": "LoHa", "lokr": "LoKr"}[kind]
        assert lora.scale(next(iter(lora.modules.values()))) == scale


def test_block_weights_scale_by_block(files, tmp_path):
    _, out = applied(files, "sd1", [f"{files['root']}/sd1_lora.safetensors:0.5:OUTALL"], tmp_path)
    with open_checkpoint(files["sd1"]) as base, open_checkpoint(out) as merged:
        in01 = "model.diffusion_model.input_blocks.1.1.proj_in.weight"  # OUTALL: IN01 is 0
        out05 = "model.diffusion_model.output_blocks.5.1.proj_in.weight"
        text = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"  # BASE is 1
        assert torch.equal(merged[in01], base[in01])
        name = "lora_unet_up_blocks_1_attentions_2_proj_in"
        delta = 0.5 * expected_delta(files["sd1_lora"], name)
        assert torch.allclose(merged[out05], base[out05] + delta.reshape(base[out05].shape), atol=1e-5)
        assert not torch.equal(merged[text], base[text])


def test_two_loras_add_up(files, tmp_path):
    root = files["root"]
    _, both = applied(files, "sd1", [f"{root}/sd1_lora.safetensors:0.5", f"{root}/sd1_loha.safetensors:1"], tmp_path)
    key = "model.diffusion_model.input_blocks.2.1.proj_out.weight"  # down_blocks_0_attentions_1: in both
    with open_checkpoint(files["sd1"]) as base, open_checkpoint(both) as merged:
        lora = 0.5 * expected_delta(files["sd1_lora"], "lora_unet_down_blocks_0_attentions_1_proj_out")
        loha = expected_delta(files["sd1_loha"], "lora_unet_down_blocks_0_attentions_1_proj_out", "loha")
        assert torch.allclose(merged[key], base[key] + (lora + loha).reshape(base[key].shape), atol=1e-4)


def test_the_recipe_is_in_the_metadata(files, tmp_path):
    _, out = applied(files, "sd1", [f"{files['root']}/sd1_lora.safetensors:0.5:OUTALL"], tmp_path, dtype="fp16")
    with open_checkpoint(out) as merged:
        recipe = json.loads(merged.metadata[RECIPE_KEY])
        assert merged.dtype("model.diffusion_model.out.2.weight") == torch.float16
    with open_checkpoint(files["sd1"]) as base:
        assert recipe["checkpoint"] == {"name": "sd1.safetensors", "sha256": base.sha256()}
    assert recipe["loras"][0]["ratio"] == 0.5 and recipe["loras"][0]["block_values"]["OUT05"] == 0.5
    assert recipe["architecture"] == "SD1.x" and recipe["operation"] == "to_checkpoint"


def test_a_lora_for_another_architecture_is_refused(files, tmp_path):
    with pytest.raises(ArchitectureError, match=r"sdxl_lora.safetensors: \d+ of \d+ modules do not fit "
                                                r"sd1.safetensors \(SD1.x\).*looks made for SDXL"):
        applied(files, "sd1", [f"{files['root']}/sdxl_lora.safetensors:1"], tmp_path)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_lora_family_is_detected(files):
    for family in ("sd1", "sdxl"):
        with open_lora(files["root"] / f"{family}_lora.safetensors") as lora:
            assert lora_family(lora) == family
            assert lora.kind == "LoCon" and lora.ranks == (2,)


def test_an_inpainting_checkpoint_takes_a_normal_lora(files, tmp_path):
    inpainting = tiny_checkpoint(tmp_path / "inpaint.safetensors", "sd1", in_channels=9)
    out = tmp_path / "inpaint_lora.safetensors"
    loras_to_checkpoint(inpainting, [parse_entry(f"{files['root']}/sd1_lora.safetensors:1")], out)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    with open_checkpoint(inpainting) as base, open_checkpoint(out) as merged:
        assert torch.equal(merged[key][:, 4:], base[key][:, 4:])
        delta = expected_delta(files["sd1_lora"], "lora_unet_conv_in")
        assert torch.allclose(merged[key][:, :4], base[key][:, :4] + delta.reshape(10, 4, 3, 3), atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_cli_writes_the_checkpoint(files, family, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = main(["lora", "to-checkpoint", str(files[family]), f"{files['root']}/{family}_lora.safetensors:1:ALL",
                 "-o", str(out), "--device", "cpu"], command_modules=LORA_CLI)
    assert code == 0 and out.exists()
    assert "keys changed by 1 LoRA(s)" in capsys.readouterr().out


def test_the_cli_reports_errors_without_a_traceback(files, tmp_path, capsys):
    code = main(["lora", "to-checkpoint", str(files["sd1"]), str(tmp_path / "missing.safetensors"), "-o",
                 str(tmp_path / "x.safetensors")], command_modules=LORA_CLI)
    assert code == 2
    assert "missing.safetensors: no such LoRA file" in capsys.readouterr().err


def test_the_cli_describes_a_lora(files, capsys):
    assert main(["lora", "info", f"{files['root']}/sdxl_lora.safetensors", "--json"], command_modules=LORA_CLI) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "SDXL base" and info["ranks"] == [2] and info["type"] == "LoCon"
