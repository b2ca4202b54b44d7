"""Merging LoRAs (concatenation is exact, SVD reports its error) and extracting one from two checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.errors import ArchitectureError, MergeError
from mergers.lora.apply import RECIPE_KEY, loras_to_checkpoint
from mergers.lora.blocks import parse_entry
from mergers.lora.extract import extract_lora
from mergers.lora.formats import open_lora
from mergers.lora.lowrank import low_rank, low_rank_of_product
from mergers.lora.merge import merge_loras, merged_tag_frequency
from mergers.writer import save_checkpoint
from tests.test_lora_fixtures import lora_targets, make_lora, tiny_checkpoint

LORA_CLI = ("mergers.lora.cli",)
ONLY = "attentions_0"  # a subset of modules keeps the SVD tests quick on a busy CPU


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_merge")
    made = {"root": root, "sd1": tiny_checkpoint(root / "sd1.safetensors", "sd1")}
    make_lora(root / "a.safetensors", "sd1", rank=2, alpha=1.0, seed=1, only=ONLY)
    make_lora(root / "b.safetensors", "sd1", rank=3, alpha=3.0, seed=2, only=ONLY)
    make_lora(root / "h.safetensors", "sd1", kind="loha", rank=2, seed=3, only=ONLY)
    make_lora(root / "xl.safetensors", "sdxl", rank=2, seed=4, only="input_blocks_4")
    return made


def test_concatenation_equals_applying_both(files, tmp_path):
    root = files["root"]
    entries = [parse_entry(f"{root}/a.safetensors:0.7"), parse_entry(f"{root}/b.safetensors:-0.4:OUTALL")]
    result = merge_loras(entries, tmp_path / "ab.safetensors")
    assert (result.method, result.rank, result.max_error) == ("concat", 5, 0.0)
    loras_to_checkpoint(files["sd1"], entries, tmp_path / "both.safetensors")
    loras_to_checkpoint(files["sd1"], [parse_entry(f"{tmp_path}/ab.safetensors:1")], tmp_path / "merged.safetensors")
    with open_checkpoint(tmp_path / "both.safetensors") as both, \
            open_checkpoint(tmp_path / "merged.safetensors") as one:
        for key in both:
            assert torch.allclose(both[key], one[key], atol=1e-5), key
    with open_lora(tmp_path / "ab.safetensors") as merged:
        assert merged.ranks == (2, 5)  # OUTALL gives b nothing in the IN blocks: a alone there
        assert json.loads(merged.metadata[RECIPE_KEY])["method"] == "concat"


def test_svd_to_a_lower_rank_reports_the_error_it_leaves(files, tmp_path):
    root = files["root"]
    entries = [parse_entry(f"{root}/a.safetensors:1"), parse_entry(f"{root}/b.safetensors:1")]
    result = merge_loras(entries, tmp_path / "r3.safetensors", rank=3)
    assert result.method == "svd" and result.rank == 3 and 0 < result.max_error < 1
    exact = merge_loras(entries, tmp_path / "r8.safetensors", rank=8)  # 2 + 3 fits: concatenated
    assert exact.method == "concat" and exact.max_error == 0


def test_lycoris_merges_by_svd_only(files, tmp_path):
    entries = [parse_entry(f"{files['root']}/a.safetensors:1"), parse_entry(f"{files['root']}/h.safetensors:1")]
    with pytest.raises(MergeError, match="loha modules cannot be concatenated; give a rank"):
        merge_loras(entries, tmp_path / "x.safetensors")
    result = merge_loras(entries, tmp_path / "x.safetensors", rank="auto")
    assert result.method == "svd" and result.rank == 2


def test_loras_of_different_models_are_not_merged(files, tmp_path):
    entries = [parse_entry(f"{files['root']}/a.safetensors:1"), parse_entry(f"{files['root']}/xl.safetensors:1")]
    with pytest.raises(ArchitectureError, match="xl.safetensors is a SDXL base LoRA, a.safetensors is SD1.x"):
        merge_loras(entries, tmp_path / "x.safetensors")


def test_low_rank_factors_are_the_best_approximation():
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(12, 3, generator=generator), torch.randn(3, 20, generator=generator)
    exact = low_rank(up @ down, 3)
    assert exact.error < 1e-5 and torch.allclose(exact.up @ exact.down, up @ down, atol=1e-4)
    cut = low_rank(up @ down, 2)
    singular = torch.linalg.svdvals(up @ down)
    assert cut.error == pytest.approx(float(singular[2] / singular.norm()), rel=1e-4)
    via_qr = low_rank_of_product(up, down, 2, (12, 20))
    assert torch.allclose(via_qr.up @ via_qr.down, cut.up @ cut.down, atol=1e-4)


def test_tag_frequencies_are_summed():
    merged = merged_tag_frequency([{"ss_tag_frequency": '{"d": {"cat": 2, "dog": 1}}'},
                                   {"ss_tag_frequency": '{"d": {"cat": 1}, "e": {"x": 4}}'}, {}])
    assert merged == {"d": {"cat": 3, "dog": 1}, "e": {"x": 4}}


@pytest.fixture(scope="module")
def tuned(files, tmp_path_factory):
    """The base plus a known rank-2 change (4 of them: linear, 1x1 conv, q of in_proj-free SD1 TE, 3x3 conv)."""
    root = tmp_path_factory.mktemp("tuned")
    generator = torch.Generator().manual_seed(7)
    changes = {}
    with open_checkpoint(files["sd1"]) as base:
        tensors = {key: base[key] for key in base}
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.weight",
                "model.diffusion_model.output_blocks.4.0.in_layers.2.weight"):
        shape = tensors[key].shape
        change = (torch.randn(shape[0], 2, generator=generator) @ torch.randn(2, shape[1:].numel(),
                                                                             generator=generator)).reshape(shape)
        tensors[key] = tensors[key] + change
        changes[key] = change
    save_checkpoint(root / "tuned.safetensors", tensors)
    return root / "tuned.safetensors", changes


def test_extraction_recovers_a_known_low_rank_difference(files, tuned, tmp_path):
    path, changes = tuned
    out = tmp_path / "x.safetensors"
    result = extract_lora(path, files["sd1"], out, rank=4, conv_rank=4, dtype="fp32", device="cpu")
    assert result.modules == len(changes)  # the rest do not differ: left out
    assert result.max_error < 1e-5
    loras_to_checkpoint(files["sd1"], [parse_entry(f"{out}:1")], tmp_path / "again.safetensors")
    with open_checkpoint(path) as want, open_checkpoint(tmp_path / "again.safetensors") as got:
        for key in changes:
            assert torch.allclose(got[key], want[key], atol=1e-4), key


def test_extraction_without_conv_rank_leaves_the_resnets(files, tuned, tmp_path):
    path, changes = tuned
    result = extract_lora(path, files["sd1"], tmp_path / "x.safetensors", rank=4, device="cpu")
    assert result.modules == len(changes) - 1  # the 3x3 resnet conv needs conv_rank
    with open_lora(tmp_path / "x.safetensors") as lora:
        assert "lora_unet_mid_block_attentions_0_proj_in" in lora.modules
        assert json.loads(lora.metadata[RECIPE_KEY])["operation"] == "extract"


def test_extraction_with_alpha_and_beta_scales_both(files, tuned, tmp_path):
    path, _ = tuned
    result = extract_lora(path, files["sd1"], tmp_path / "x.safetensors", rank=1, alpha=2.0, beta=1.0,
                          device="cpu", dtype="fp32")
    assert result.modules > 100 and result.max_error > 0  # 2·A − B is A + (A − B): every layer, full rank


def test_the_cli_merges_and_extracts(files, tuned, tmp_path, capsys):
    root = files["root"]
    assert main(["lora", "merge", f"{root}/a.safetensors:0.5", f"{root}/b.safetensors:1", "-o",
                 str(tmp_path / "m.safetensors"), "--rank", "auto"], command_modules=LORA_CLI) == 0
    assert "by svd" in capsys.readouterr().out
    assert main(["lora", "extract", str(tuned[0]), str(files["sd1"]), "-o", str(tmp_path / "e.safetensors"),
                 "--rank", "2", "--conv-rank", "2"], command_modules=LORA_CLI) == 0
    assert "4 modules" in capsys.readouterr().out
    assert main(["lora", "extract", str(tuned[0]), str(files["sd1"]), "-o", str(tmp_path / "e.safetensors"),
                 "--rank", "0"], command_modules=LORA_CLI) == 2
    assert "rank 0: give a whole number" in capsys.readouterr().err


def test_lora_targets_cover_the_fixture(files):
    assert len(lora_targets("sd1", convs=False)) < len(lora_targets("sd1"))
