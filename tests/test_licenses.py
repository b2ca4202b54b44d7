"""Licenses: each input's terms from its architecture, metadata and sidecars; how they combine; what a merge writes.

Every file here is a small checkpoint with real key names (mergers.demo's scaled-down SD models, Flux's
real key list cut to tiny shapes), with the sidecars web-UI users keep beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergers.arch import key_specs
from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.demo import tiny_state_dict
from mergers.licenses import (
    LICENSE_KEY,
    Terms,
    combine_terms,
    commercial_uses,
    license_lines,
    read_input_terms,
    terms_of_models,
    write_user_terms,
)
from mergers.licenses.terms import LicenseError
from mergers.merge import merge_to_file, resolve_path
from mergers.recipe import Recipe
from mergers.writer import save_checkpoint

ALL_USES = ("Image", "RentCivit", "Rent", "Sell")


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


def sd_model(folder: Path, name: str, family: str = "sd1", *, seed: int = 1, metadata=None) -> Path:
    path = folder / name
    save_checkpoint(path, tiny_state_dict(family, seed=seed), metadata=metadata)
    return path


def flux_model(folder: Path, name: str, *, dev: bool, bare: bool = False) -> Path:
    """Flux's diffusion-model keys at tiny shapes; [schnell] lacks the guidance embedder."""
    tensors = {}
    for spec in key_specs("flux"):
        if spec.component != "diffuser" or (not dev and "guidance_in." in spec.key):
            continue
        key = spec.aliases[0] if bare and spec.aliases else spec.key
        tensors[key] = torch.zeros(tuple(min(n, 2) for n in spec.shape), dtype=torch.float16)
    path = folder / name
    save_checkpoint(path, tensors)
    return path


def keys_model(folder: Path, name: str, keys) -> Path:
    path = folder / name
    save_checkpoint(path, {key: torch.zeros(1) for key in keys})
    return path


def sidecar(model: Path, suffix: str, data) -> Path:
    path = model.with_suffix("").with_name(model.stem + suffix)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def terms_of(path: Path, role: str = "model_a"):
    with open_checkpoint(path) as ckpt:
        return read_input_terms(ckpt, role=role)


def civitai_version(**permissions) -> dict:
    """A model-version object as Civitai Helper saves it: permissions and name under "model"."""
    return {"id": 1, "modelId": 2, "name": "v1.0", "baseModel": "SD 1.5",
            "model": {"name": "Open Model", "type": "Checkpoint", "nsfw": False, **permissions},
            "creator": {"username": "alice"}}


OPEN = {"allowNoCredit": True, "allowCommercialUse": ["Image", "RentCivit", "Rent", "Sell"],
        "allowDerivatives": True, "allowDifferentLicense": True}


# --- the base license from the architecture ------------------------------------------------------------

@pytest.mark.parametrize("family,license", [
    ("sd1", "CreativeML OpenRAIL-M"),
    ("sd2", "CreativeML Open RAIL++-M"),
    ("sdxl", "CreativeML Open RAIL++-M"),
    ("sd3", "Stability AI Community License"),
])
def test_base_license_of_each_sd_family(tmp_path, family, license):
    entry = terms_of(sd_model(tmp_path, f"{family}.safetensors", family))
    assert entry.base.license == license and entry.license == license
    assert entry.base.commercial == ALL_USES and not entry.terms.known


def test_sdxl_refiner_and_sd35_large_by_their_keys(tmp_path):
    refiner = keys_model(tmp_path, "refiner.safetensors",
                         ["conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"])
    large = keys_model(tmp_path, "large.safetensors",
                       [f"model.diffusion_model.joint_blocks.{n}.x_block.attn.qkv.weight" for n in range(38)])
    assert (terms_of(refiner).architecture, terms_of(refiner).license) == ("SDXL refiner", "CreativeML Open RAIL++-M")
    assert (terms_of(large).architecture, terms_of(large).license) == ("SD3.5 Large", "Stability AI Community License")


@pytest.mark.parametrize("bare", [False, True])
def test_flux_dev_and_schnell_are_told_by_the_guidance_embedder(tmp_path, bare):
    dev = terms_of(flux_model(tmp_path, "dev.safetensors", dev=True, bare=bare))
    schnell = terms_of(flux_model(tmp_path, "schnell.safetensors", dev=False, bare=bare))
    assert dev.license == "FLUX.1 [dev] Non-Commercial License" and dev.base.commercial == ("Image",)
    assert schnell.license == "Apache-2.0" and schnell.base.commercial == ALL_USES


def test_a_flux_dev_merge_may_not_be_sold_but_its_images_may(tmp_path):
    dev = flux_model(tmp_path, "dev.safetensors", dev=True)
    schnell = flux_model(tmp_path, "schnell.safetensors", dev=False)
    for model in (dev, schnell):
        sidecar(model, ".civitai.info", civitai_version(**OPEN))
    merged = terms_of_models([str(dev), str(schnell)], resolve_path)
    assert merged.terms.commercial == ("Image",)
    assert merged.license == "FLUX.1 [dev] Non-Commercial License + Apache-2.0"
    assert any("licenses differ" in w for w in merged.warnings)
    assert any("selling this merge is not allowed (dev.safetensors)" in w for w in merged.warnings)


def test_an_unknown_architecture_has_an_unknown_license(tmp_path):
    entry = terms_of(keys_model(tmp_path, "odd.safetensors", ["some.other.model.weight"]))
    assert entry.architecture.startswith("unknown") and entry.base is None and entry.license is None
    merged = combine_terms([entry])
    assert merged.license == "unknown" and merged.terms.commercial is None
    assert any("terms of odd.safetensors are unknown" in w for w in merged.warnings)


# --- each sidecar format -----------------------------------------------------------------------------------

def test_civitai_helper_info_with_nested_model_and_creator(tmp_path):
    model = sd_model(tmp_path, "a.safetensors")
    sidecar(model, ".civitai.info", civitai_version(allowNoCredit=False, allowCommercialUse=["Image"],
                                                    allowDerivatives=True, allowDifferentLicense=False))
    entry = terms_of(model)
    assert entry.terms == Terms(credit_required=True, commercial=("Image",), derivatives=True,
                                different_license=False, author="alice", title="Open Model")
    assert entry.credits == ("alice (Open Model)",)
    assert entry.sources["derivatives"] == "a.civitai.info"


def test_info_file_with_permissions_at_top_level_and_a_single_commercial_value(tmp_path):
    model = sd_model(tmp_path, "a.safetensors")
    sidecar(model, ".info", {"name": "Top", "allowNoCredit": True, "allowCommercialUse": "Rent",
                             "allowDerivatives": False, "allowDifferentLicense": True, "creator": {"username": "bob"}})
    entry = terms_of(model)
    assert entry.terms.commercial == ("Image", "RentCivit", "Rent") and entry.terms.derivatives is False
    assert entry.terms.credit_required is False and entry.credits == ("bob (Top)",)


def test_model_json_from_a_downloader_is_read(tmp_path):
    model = sd_model(tmp_path, "a.safetensors")
    sidecar(model, ".json", {"model": {"name": "J", "allowCommercialUse": "None", "allowDerivatives": True}})
    entry = terms_of(model)
    assert entry.terms.commercial == () and entry.sources["commercial"] == "a.json"


def test_a1111_user_metadata_holds_no_terms(tmp_path):
    model = sd_model(tmp_path, "a.safetensors")
    sidecar(model, ".json", {"description": "my model", "sd version": "SD1", "activation text": "", "notes": ""})
    entry = terms_of(model)
    assert not entry.terms.known and entry.problems == () and entry.license == "CreativeML OpenRAIL-M"


def test_safetensors_metadata_license_and_author(tmp_path):
    model = sd_model(tmp_path, "a.safetensors", metadata={"modelspec.license": "Custom RAIL",
                                                         "modelspec.author": "carol",
                                                         "modelspec.title": "Carol's"})
    entry = terms_of(model)
    assert entry.license == "Custom RAIL" and entry.base.license == "CreativeML OpenRAIL-M"
    assert entry.sources["license"] == "modelspec.license in a.safetensors" and entry.credits == ("carol (Carol's)",)


@pytest.mark.parametrize("text,problem", [
    ("{not json", "a.civitai.info: not valid JSON"),
    ("[1, 2]", "a.civitai.info: not a JSON object"),
    (json.dumps({"allowCommercialUse": "Lots"}), "a.civitai.info: unknown commercial use 'Lots'"),
    (json.dumps({"allowDerivatives": "yes"}), "a.civitai.info: allowDerivatives must be true or false"),
])
def test_a_malformed_sidecar_is_named_and_does_not_block_a_merge(tmp_path, text, problem):
    model = sd_model(tmp_path, "a.safetensors")
    other = sd_model(tmp_path, "b.safetensors", seed=2)
    sidecar(model, ".civitai.info", text)
    entry = terms_of(model)
    assert not entry.terms.known and entry.problems[0].startswith(problem)
    result = merge_to_file(Recipe(model_a=str(model), model_b=str(other)), tmp_path / "out.safetensors")
    record = json.loads(result.metadata[LICENSE_KEY])
    assert record["terms"] == {} and any(note.startswith(problem) for note in record["notes"])
    assert any("terms of a.safetensors, b.safetensors are unknown" in w for w in record["warnings"])


def test_commercial_use_values():
    assert commercial_uses(["Sell", "Image"]) == ("Image", "Sell") and commercial_uses([]) == ()
    assert commercial_uses("Sell") == ALL_USES and commercial_uses(None) is None
    with pytest.raises(LicenseError, match="x.info: allowCommercialUse must be a list"):
        commercial_uses(3, source="x.info")


# --- combining: the most restrictive of all inputs ---------------------------------------------------------------

@pytest.fixture
def trio(tmp_path):
    """a: open, credit not required; b: no derivatives, credit to bob, images only; c: other license not allowed."""
    a, b, c = (sd_model(tmp_path, f"{n}.safetensors", seed=s) for s, n in enumerate("abc", 1))
    sidecar(a, ".civitai.info", civitai_version(**OPEN))
    sidecar(b, ".civitai.info", {"name": "v2", "model": {"name": "Bee", "allowNoCredit": False,
                                                         "allowCommercialUse": ["Image"], "allowDerivatives": False,
                                                         "allowDifferentLicense": True},
                                 "creator": {"username": "bob"}})
    sidecar(c, ".info", {**OPEN, "allowCommercialUse": ["Image", "Rent"], "allowDifferentLicense": False,
                         "name": "See", "creator": {"username": "cy"}})
    return a, b, c


def test_two_inputs_take_the_most_restrictive_terms(trio):
    a, b, _ = trio
    merged = terms_of_models([str(a), str(b)], resolve_path)
    assert merged.terms == Terms(license="CreativeML OpenRAIL-M", credit_required=True, commercial=("Image",),
                                 derivatives=False, different_license=True)
    assert merged.credits == ("bob (Bee)",)
    assert merged.warnings[0] == "b.safetensors allows no derivatives: this merge should not be shared"
    assert "selling this merge is not allowed (b.safetensors); allowed at most: sell images" in merged.warnings
    assert "credit required: bob (Bee)" in merged.notes
    assert any("use restrictions carry over" in note for note in merged.notes)


def test_three_inputs_and_the_license_they_bind_to(trio):
    merged = terms_of_models([str(p) for p in trio], resolve_path)
    assert merged.terms.commercial == ("Image",) and merged.terms.different_license is False
    assert ("share it only under CreativeML OpenRAIL-M (c.safetensors allows no other license for merges)"
            in merged.notes)
    assert [e.role for e in merged.inputs] == ["model_a", "model_b", "model_c"]


def test_inputs_that_each_require_their_own_license_conflict(trio, tmp_path):
    a, _, c = trio
    sidecar(a, ".civitai.info", {**OPEN, "allowDifferentLicense": False, "license": "License A"})
    merged = terms_of_models([str(a), str(c)], resolve_path)
    assert merged.license == "License A + CreativeML OpenRAIL-M"
    assert any("no license satisfies all of them" in w for w in merged.warnings)


def test_one_unknown_input_makes_a_permission_unknown_unless_another_forbids_it(trio, tmp_path):
    a, b, _ = trio
    unknown = sd_model(tmp_path, "u.safetensors", seed=9)
    with_unknown = terms_of_models([str(a), str(unknown)], resolve_path)
    assert with_unknown.terms.derivatives is None and with_unknown.terms.commercial is None
    assert with_unknown.commercial_at_most == ALL_USES
    assert "commercial use: unknown (at most:" in "\n".join(license_lines(with_unknown))
    forbidding = terms_of_models([str(b), str(unknown)], resolve_path)
    assert forbidding.terms.derivatives is False and forbidding.terms.credit_required is True
    none = Terms(commercial=())
    assert combine_terms([_entry(none), _entry(Terms())]).terms.commercial == ()


def _entry(terms: Terms):
    from mergers.licenses.sources import InputTerms
    return InputTerms("model_a", "x.safetensors", "SD1.x", None, terms)


# --- terms set by hand ---------------------------------------------------------------------------------------

def test_user_terms_override_the_sidecars_and_are_used_from_then_on(trio):
    _, b, _ = trio
    path = write_user_terms(b, Terms(derivatives=True, commercial=ALL_USES, author="bob"))
    assert path.name == "b.license.json"
    assert json.loads(path.read_text(encoding="utf-8"))["allowCommercialUse"] == list(ALL_USES)
    entry = terms_of(b)
    assert entry.terms.derivatives is True and entry.terms.commercial == ALL_USES
    assert entry.terms.credit_required is True  # not set by hand: the info file's
    assert entry.sources["derivatives"] == "b.license.json (set by hand)"


def test_a_bad_user_file_is_named_and_ignored(trio):
    _, b, _ = trio
    (b.parent / "b.license.json").write_text("{", encoding="utf-8")
    entry = terms_of(b)
    assert entry.terms.derivatives is False and entry.problems[0].startswith("b.license.json: not valid JSON")


# --- what a merge writes, and a merged file used again -------------------------------------------------------------

def test_the_merged_file_carries_the_combined_terms_and_info_prints_them(trio, tmp_path, capsys):
    a, b, _ = trio
    out = tmp_path / "ab.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: b.safetensors allows no derivatives: this merge should not be shared" in printed
    assert "model_b b.safetensors (SD1.x)" in printed
    with open_checkpoint(out) as ckpt:
        metadata = ckpt.metadata
    assert metadata["modelspec.license"] == "CreativeML OpenRAIL-M"
    record = json.loads(metadata[LICENSE_KEY])
    assert record["terms"]["allowDerivatives"] is False and record["credits"] == ["bob (Bee)"]
    assert [i["name"] for i in record["inputs"]] == ["a.safetensors", "b.safetensors"]
    assert record["inputs"][1]["sources"]["derivatives"] == "b.civitai.info"
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "license (an aid, not legal advice" in info and "terms: CreativeML OpenRAIL-M; credit: required" in info
    assert "made from: model_b b.safetensors: CreativeML OpenRAIL-M; credit: required; commercial use: sell images; " \
           "derivatives: no" in info
    assert "warning: b.safetensors allows no derivatives" not in info  # the file's own terms: ab.safetensors
    assert "warning: ab.safetensors allows no derivatives: this merge should not be shared" in info
    assert main(["info", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["license"]["terms"]["allowDerivatives"] is False


def test_a_merged_file_used_again_keeps_its_restrictions_and_credits(trio, tmp_path):
    a, b, _ = trio
    first = merge_to_file(Recipe(model_a=str(a), model_b=str(b)), tmp_path / "ab.safetensors").path
    again = terms_of_models([str(first), str(a)], resolve_path)
    merged_input = again.inputs[0]
    assert merged_input.terms.derivatives is False and merged_input.credits == ("bob (Bee)",)
    assert merged_input.sources["derivatives"] == f"{LICENSE_KEY} in ab.safetensors"
    assert again.terms.derivatives is False and again.credits == ("bob (Bee)",)


def test_a_chained_recipe_reads_every_leaf(trio, tmp_path):
    a, b, c = trio
    inner = Recipe(model_a=str(a), model_b=str(b))
    result = merge_to_file(Recipe(model_a=inner, model_b=str(c)), tmp_path / "chain.safetensors")
    record = json.loads(result.metadata[LICENSE_KEY])
    assert [i["role"] for i in record["inputs"]] == ["model_a.model_a", "model_a.model_b", "model_b"]
    assert record["terms"]["allowDerivatives"] is False and record["terms"]["allowDifferentLicense"] is False
    saved = tmp_path / "inner.recipe.json"
    saved.write_text(inner.to_json(), encoding="utf-8")
    from_file = terms_of_models([str(saved), str(c)], resolve_path)
    assert [e.name for e in from_file.inputs] == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_run_prints_the_license(trio, tmp_path, capsys):
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(Recipe(model_a="a.safetensors", model_b="b.safetensors").to_json(), encoding="utf-8")
    assert main(["run", str(recipe_file), "-o", str(tmp_path / "r.safetensors")]) == 0
    assert "warning: b.safetensors allows no derivatives" in capsys.readouterr().out


def test_the_base_license_table_is_data_with_every_original_family():
    from mergers.licenses.bases import base_licenses
    table = base_licenses()
    for family in ("sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "sd35_large", "flux_dev", "flux_schnell"):
        assert table[family].license and table[family].commercial is not None, family
    assert table["kolors"].commercial is None and table["stable_cascade"].commercial == ()
    assert "flux" not in table  # Flux is told apart by its weights, never given one license for both


def test_no_commercial_use_names_the_input_that_allows_none(trio):
    a, b, c = trio
    sidecar(c, ".info", {**OPEN, "allowCommercialUse": "None"})
    merged = terms_of_models([str(p) for p in (a, b, c)], resolve_path)
    assert merged.terms.commercial == ()
    assert ("no commercial use: c.safetensors allows none, so do not sell this merge, rent it out or sell its images"
            in merged.warnings)
