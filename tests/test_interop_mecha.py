"""sd-mecha 1.x recipes, made and merged by the real sd-mecha (a test dependency), replayed by ours.

Each case merges small real-layout SD1 files with sd-mecha, then replays the ``mecha_recipe`` it
wrote with ``python -m mergers recipe`` and compares every tensor, bit for bit.
"""

import json

import pytest
import sd_mecha
import torch
from sd_mecha.extensions.merge_methods import resolve

from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.demo import tiny_state_dict
from mergers.interop import describe_stored_recipes
from mergers.writer import save_checkpoint

SD1_BLOCKS = ["BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12))]


@pytest.fixture(autouse=True)
def _quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")  # sd-mecha's per-key progress bar


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A base model A and three fine-tunes of it (B, C, D: A plus small noise), as task merges expect."""
    folder = tmp_path_factory.mktemp("mecha_models")
    base = tiny_state_dict("sd1", seed=1)
    for seed, name in enumerate("abcd"):
        noise = torch.Generator().manual_seed(seed + 10)
        state = {k: (t + 0.05 * torch.randn(t.shape, generator=noise).to(t.dtype)) if name != "a" and t.is_floating_point()
                 else t for k, t in base.items()}
        save_checkpoint(folder / f"{name}.safetensors", state)
    return folder


def _models(folder):
    return [sd_mecha.model(str(folder / f"{name}.safetensors")) for name in "abcd"]


def _blocks(a):
    values = {name: round(0.9 - n / 30, 3) for n, name in enumerate(SD1_BLOCKS)}
    return sd_mecha.convert(sd_mecha.literal(values, "sd1-supermerger_blocks"), a)


# sd-mecha's own calls; ``resolve("add_difference")`` is its bare method, as its wrappers use it.
CASES = {
    "weighted_sum": lambda a, b, c, d: sd_mecha.weighted_sum(a, b, alpha=0.3),
    "weighted_sum_per_block": lambda a, b, c, d: sd_mecha.weighted_sum(a, b, alpha=_blocks(a)),
    "add_difference": lambda a, b, c, d: sd_mecha.add_difference(a, b, c, alpha=0.7),
    "slerp": lambda a, b, c, d: sd_mecha.slerp(a, b, alpha=0.4),
    "add_perpendicular": lambda a, b, c, d: sd_mecha.add_perpendicular(a, b, c, alpha=0.6),
    "ties_sum": lambda a, b, c, d: resolve("add_difference")(
        a, sd_mecha.ties_sum(sd_mecha.subtract(b, a), sd_mecha.subtract(c, a), sd_mecha.subtract(d, a), k=0.5),
        alpha=0.8),
    "geometric_median": lambda a, b, c, d: sd_mecha.geometric_median(a, b, c),
    "n_model_stock": lambda a, b, c, d: sd_mecha.n_model_stock(a, b, c),
    "chained": lambda a, b, c, d: resolve("add_difference")(
        sd_mecha.weighted_sum(a, b, alpha=0.25), sd_mecha.subtract(c, d), alpha=0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_sd_mecha_merges_replay_to_its_tensors(case, folder, tmp_path, capsys):
    mecha = tmp_path / "mecha.safetensors"
    sd_mecha.merge(CASES[case](*_models(folder)), output=mecha, threads=0)
    again = tmp_path / "again.safetensors"
    # Model Stock's per-row cosine is ±1 on 1×1 convolutions, so sd-mecha writes Inf there too.
    extra = ["--allow-non-finite"] if case == "n_model_stock" else []
    assert main(["recipe", str(mecha), "--models", str(folder), "-o", str(again), *extra]) == 0
    printed = capsys.readouterr().out
    assert "sd-mecha's: its formulas in fp32" in printed and "merge_dtype" in printed  # says what it assumed
    with open_checkpoint(mecha) as theirs, open_checkpoint(again) as ours:
        assert sorted(ours) == sorted(theirs)
        differ = [key for key in theirs if not torch.equal(theirs[key], ours[key])]
        assert differ == [], f"{len(differ)} keys differ, e.g. {differ[:3]}"
        assert {ours.dtype(k) for k in ours} == {torch.float16}  # sd-mecha's default output dtype, read from the file


def test_sd_mecha_recipe_maps_to_a_readable_recipe(folder):
    a, b, c, d = _models(folder)
    text = sd_mecha.serialize(sd_mecha.add_difference(a, b, c, alpha=0.7))
    assert 'merge "fallback"' in text and 'merge "convert_singleton"' in text  # what 1.x really writes
    mapped = describe_stored_recipes({"mecha_recipe": text}, file_dtype="fp32")["sd-mecha"]
    assert mapped["runnable"], mapped["cannot_map"]
    recipe = mapped["recipe"]
    assert (recipe["mode"], recipe["calcmode"], recipe["alpha"], recipe["dtype"]) == \
        ("add_difference", "sd-mecha", 0.7, "fp32")
    assert (recipe["model_a"], recipe["model_b"], recipe["model_c"]) == ("a.safetensors", "b.safetensors", "c.safetensors")
    assert mapped["summary"] == "fallback(add_difference(a.safetensors, subtract(b.safetensors, c.safetensors), 0.7), " \
                                "a.safetensors)"
    blocks = describe_stored_recipes({"mecha_recipe": sd_mecha.serialize(CASES["weighted_sum_per_block"](a, b, c, d))})
    recipe = blocks["sd-mecha"]["recipe"]
    assert recipe["weights_alpha"].split(",")[:2] == ["0.9", "0.867"]
    assert recipe["elemental"] == "IN00:time_embed label_emb:0.9"  # sd-mecha gives the time embedding BASE's value


def test_sd_mecha_what_does_not_map_is_named(folder):
    a, b, c, _ = _models(folder)
    sub = sd_mecha.subtract

    def reasons(node):
        mapped = describe_stored_recipes({"mecha_recipe": sd_mecha.serialize(node)})["sd-mecha"]
        assert not mapped["runnable"] and mapped["recipe"] is None
        return " ".join(mapped["cannot_map"])

    assert "method 'crossover' has no counterpart here" in reasons(sd_mecha.crossover(a, b))
    assert "vote_sgn=True" in reasons(resolve("add_difference")(a, sd_mecha.ties_sum(sub(b, a), sub(c, a), vote_sgn=True)))
    assert "eps=0.001" in reasons(sd_mecha.geometric_median(a, b, c, eps=1e-3))
    assert "fewer than 3 models" in reasons(sd_mecha.geometric_median(a, b))
    assert "a bare subtract" in reasons(sub(a, b))
    assert "alpha given as train_difference_mask" in reasons(
        sd_mecha.weighted_sum(a, b, alpha=sd_mecha.train_difference_mask(a, b, c)))
    broken = describe_stored_recipes({"mecha_recipe": "merge nothing"})["sd-mecha"]
    assert "cannot read it" in broken["cannot_map"][0]


def test_info_says_which_arithmetic_and_what_sd_mecha_does_not_record(folder, tmp_path, capsys):
    a, b, _, _ = _models(folder)
    mecha = tmp_path / "mecha.safetensors"
    sd_mecha.merge(sd_mecha.weighted_sum(a, b, alpha=0.3), output=mecha, threads=0)
    assert main(["info", str(mecha), "--json"]) == 0
    mapped = json.loads(capsys.readouterr().out)["stored_recipes"]["sd-mecha"]
    assert mapped["arithmetic"].startswith("sd-mecha's") and mapped["recipe"]["calcmode"] == "sd-mecha"
    assert any(item.startswith("merge_dtype") for item in mapped["not_recorded"])


def test_sdxl_per_block_replay_differs_only_where_info_says(tmp_path, capsys):
    """SDXL's 20 blocks (and a VAE block equal to BASE) map; OpenCLIP-G's positional embedding is the
    one key our plan (like the original SuperMerger's) keeps as A where sd-mecha merges it."""
    for seed, name in enumerate("ab", start=1):
        save_checkpoint(tmp_path / f"{name}.safetensors", tiny_state_dict("sdxl", seed=seed))
    a, b = (sd_mecha.model(str(tmp_path / f"{name}.safetensors")) for name in "ab")
    names = ["BASE", *(f"IN{i:02}" for i in range(9)), "M00", *(f"OUT{i:02}" for i in range(9))]
    values = {name: round(0.9 - n / 25, 3) for n, name in enumerate(names)}
    blocks = sd_mecha.convert(sd_mecha.literal({**values, "VAE": 0.9}, "sdxl-supermerger_blocks"), a)
    mecha = tmp_path / "mecha.safetensors"
    sd_mecha.merge(sd_mecha.weighted_sum(a, b, alpha=blocks), output=mecha, threads=0)
    again = tmp_path / "again.safetensors"
    assert main(["recipe", str(mecha), "--models", str(tmp_path), "-o", str(again)]) == 0
    assert "positional_embedding stays model A's" in capsys.readouterr().out
    with open_checkpoint(mecha) as theirs, open_checkpoint(again) as ours:
        assert sorted(ours) == sorted(theirs)
        assert [k for k in theirs if not torch.equal(theirs[k], ours[k])] == \
            ["conditioner.embedders.1.model.positional_embedding"]
