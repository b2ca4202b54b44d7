"""Calculation modes: known answers on literal tensors, scipy agreement, and whole merges
checked key by key against the original's code path restated here."""

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from mergers.arch import block_of
from mergers.checkpoint import open_checkpoint
from mergers.demo import tiny_state_dict
from mergers.errors import RecipeError
from mergers.merge import merge_to_file
from mergers.methods import METHODS, calcmodes_for, method_for
from mergers.methods.calc import (
    CosineStats,
    cosine_a,
    cosine_b,
    extract,
    plus_random,
    self_scale,
    smooth_add,
    tensor2_swap,
    tensor_swap,
    train_difference,
)
from mergers.methods.filters import gaussian_filter, median_filter3, reflect_indices, smooth
from mergers.recipe import Recipe
from mergers.writer import save_checkpoint


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


# known answers -------------------------------------------------------------------

def test_cosine_a_known_answer():
    # a_n = [0.6, 0.8], b_n = [0.8, 0.6]: cosine 0.96 both ways; k = 0.96 - |alpha| = 0.5
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    out = cosine_a(a, b, alpha=-0.46, sims_min=0.0, sims_max=1.0)
    assert torch.allclose(out, torch.tensor([3.5, 3.5]))


def test_cosine_b_known_answer_uses_signed_alpha():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    assert torch.allclose(cosine_b(a, b, alpha=0.46, sims_min=0.0, sims_max=1.0), torch.tensor([3.5, 3.5]))
    assert torch.equal(cosine_b(a, b, alpha=-0.46, sims_min=0.0, sims_max=1.0), a)  # k clipped to 1 → A
    assert torch.equal(cosine_b(a, b, alpha=1.0, sims_min=0.0, sims_max=1.0), b)  # k clipped to 0 → B


def test_cosine_stats_trim_percentiles_like_the_original():
    sims = np.arange(101) / 100
    stats = CosineStats(normalise=False, combined=True).reduce([sims[:50].astype(np.float32), sims[50:], [np.nan]])
    # 1st percentile (midpoint) 0.01 is kept; the 99th of the 100 left is (0.99 + 1.0)/2, so 1.0 goes
    assert stats == {"sims_min": pytest.approx(0.01), "sims_max": pytest.approx(0.99)}


def test_cosine_a_statistics_use_the_plain_cosine_and_the_variant_the_combined_score():
    a, b = torch.tensor([[3.0, 1.0], [4.0, 2.0]]), torch.tensor([[4.0, 2.0], [3.0, 1.0]])
    plain = CosineStats(normalise=True, combined=False).collect(a, b)
    combined = CosineStats(normalise=True, combined=True).collect(a, b)
    a_n, b_n = F.normalize(a, dim=0), F.normalize(b, dim=0)
    assert np.allclose(plain, F.cosine_similarity(a_n, b_n, dim=0).numpy())
    whole = float((a_n * b_n).sum() / (a_n.norm() * b_n.norm()))
    assert np.allclose(combined, (plain + whole) / 2)


def test_train_difference_known_answer():
    # diff = [2, 0]; |B-C| = [2, 0]; |B-A| = [2, 0]; scale = [0.5, 0] → A + [0.5*2, 0] * 1.8
    a, b, c = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(train_difference(a, b, c, alpha=1.0), torch.tensor([2.8, 1.0]))
    assert torch.equal(train_difference(a, b, b.clone(), alpha=1.0), a)


def test_extract_known_answers():
    a, b, c = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # cos(B-A, C-A) = 0 → d = 0.5 (gamma 1); lerp(d, 1-d, beta) = 0.5; lerp(B-A, C-A, 0.5) = [0.5, 0.5]
    assert torch.allclose(extract(a, b, c, alpha=0.5, beta=0.0, gamma=1.0), torch.tensor([[0.25, 0.25]]))
    # gamma 0 → d = 1; beta 0 keeps it all; alpha 0 picks B - A
    assert torch.allclose(extract(a, b, c, alpha=0.0, beta=0.0, gamma=0.0), torch.tensor([[1.0, 0.0]]))
    # beta 1 → 1 - d = 0: nothing is added
    assert torch.allclose(extract(a, b, c, alpha=0.3, beta=1.0, gamma=0.0), a)


def test_smooth_add_of_a_constant_difference_adds_it():
    a, b, c = torch.zeros(4, 5), torch.full((4, 5), 3.0), torch.ones(4, 5)
    assert torch.allclose(smooth_add(a, b, c, alpha=0.5), torch.ones(4, 5))


def test_tensor_swaps_rows():
    a, b = torch.zeros(10, 2), torch.ones(10, 2)
    out = tensor_swap(a, b, alpha=0.3, beta=0.2)  # rows [2, 5) from B
    assert out[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    out = tensor_swap(a, b, alpha=0.8, beta=0.5)  # past 1: B with rows [int(10·0.3), int(10·0.5)) = [3, 5) from A
    assert out[:, 0].tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    out = tensor_swap(a, b, alpha=0.7, beta=0.5)  # int(10·(1.2 − 1)) is 1 in floating point, as in the original
    assert out[:, 0].tolist() == [1, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_tensor2_swaps_columns_with_the_originals_length_rule():
    out = tensor2_swap(torch.zeros(4, 200), torch.ones(4, 200), alpha=0.25, beta=0.5)
    assert out[0].nonzero().flatten().tolist() == list(range(100, 150))
    # shape[1] <= 100: the indices come from shape[0] = 10 (the original's quirk), applied to columns
    out = tensor2_swap(torch.zeros(10, 4), torch.ones(10, 4), alpha=0.3, beta=0.0)
    assert out[0].tolist() == [1, 1, 1, 0]
    assert tensor2_swap(torch.zeros(6), torch.ones(6), alpha=0.5, beta=0.0).tolist() == [1, 1, 1, 0, 0, 0]


def test_self_and_plus_random():
    a = torch.tensor([2.0, -4.0])
    assert torch.equal(self_scale(a, a, alpha=0.5), torch.tensor([1.0, -2.0]))
    one = plus_random(torch.zeros(1000), None, alpha=1.0, seed=3, key="k")
    assert torch.equal(one, plus_random(torch.zeros(1000), None, alpha=1.0, seed=3, key="k"))
    assert not torch.equal(one, plus_random(torch.zeros(1000), None, alpha=1.0, seed=3, key="j"))
    assert abs(float(one.mean())) < 0.15 and 0.85 < float(one.std()) < 1.15


# scipy agreement -------------------------------------------------------------------

def test_reflect_indices_match_scipy_reflect():
    for size in (1, 2, 3, 5):
        row = np.arange(size, dtype=np.float64)
        padded = np.pad(row, 4, mode="symmetric") if size > 1 else np.zeros(9)
        assert reflect_indices(size, 4).tolist() == padded.astype(int).tolist()


@pytest.mark.parametrize("shape", [(7,), (1,), (2,), (5, 6), (1, 9), (4, 3, 3, 3), (3, 1, 1, 1), (40, 30), (8, 4, 3, 3)])
def test_filters_agree_with_scipy(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    median = scipy.ndimage.median_filter(x.numpy(), size=3)
    assert np.array_equal(median_filter3(x).numpy(), median)
    gauss = scipy.ndimage.gaussian_filter(x.numpy(), sigma=1)
    assert np.allclose(gaussian_filter(x).numpy(), gauss, atol=1e-6)
    assert np.allclose(smooth(x).numpy(), scipy.ndimage.gaussian_filter(median, sigma=1), atol=1e-6)


def test_median_filter_chunks_give_the_same_answer(monkeypatch):
    import mergers.methods.filters as filters

    x = torch.randn(37, 11)
    whole = median_filter3(x)
    monkeypatch.setattr(filters, "MEDIAN_CHUNK_VALUES", 9 * 11 * 4)  # 4 rows a chunk
    assert torch.equal(median_filter3(x), whole)


# the table ---------------------------------------------------------------------------

def test_mode_table_follows_the_originals_available_modes():
    foreign = ["A1111", "sd-mecha"]  # other tools' arithmetic, for replays of their recipes (test_interop)
    assert calcmodes_for("Weight sum") == ["normal", "cosineA", "cosineB", "tensor", "tensor2", "self", "plus random",
                                           "cosineA consistent", *foreign]
    assert calcmodes_for("Add difference") == ["normal", "trainDifference", "smoothAdd", "smoothAdd MT", "extract",
                                               *foreign]
    assert calcmodes_for("Triple sum") == ["normal"] and calcmodes_for("sum Twice") == ["normal"]
    with pytest.raises(RecipeError, match="trainDifference works with Add difference"):
        method_for("Weight sum", "trainDifference")
    assert method_for("Add difference", "smoothAdd MT") is method_for("Add difference", "smoothAdd")


# whole merges vs the original's code path ----------------------------------------------

def _write(folder, family, seeds=(1, 2, 3), dtype=torch.float16):
    paths = []
    for seed in seeds:
        path = folder / f"{family}_{seed}.safetensors"
        save_checkpoint(path, tiny_state_dict(family, seed=seed, dtype=dtype, optional=True))
        paths.append(path)
    return paths


def _load(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k] for k in ckpt}


def _original_cosine_stats(sa, sb, calcmode):
    """``precosine`` over whole state dicts, as the original does it."""
    sims = np.array([], dtype=np.float64)
    for key in sa:
        if "first_stage_model" in key or "model" not in key or key not in sb:
            continue
        a, b = sa[key].to(torch.float32), sb[key].to(torch.float32)
        if calcmode == "cosineA":
            value = torch.nn.CosineSimilarity(dim=0)(F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0))
        else:
            dot = torch.dot(a.view(-1), b.view(-1)) / (torch.norm(a) * torch.norm(b))
            value = (torch.nn.CosineSimilarity(dim=0)(a, b) + dot) / 2.0
        sims = np.append(sims, value.numpy())
    sims = sims[~np.isnan(sims)]
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
    return np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))


def _original_key(calcmode, a, b, c, alpha, beta, gamma, sims):
    """One merged key as the original's stage 1 computes it (uselerp on, use32 off)."""
    if calcmode in ("cosineA", "cosineB"):
        x, y = (F.normalize(a.float(), p=2, dim=0), F.normalize(b.float(), p=2, dim=0)) if calcmode == "cosineA" \
            else (a.float(), b.float())
        combined = (torch.nn.CosineSimilarity(dim=0)(x, y) + torch.dot(x.view(-1), y.view(-1)) / (x.norm() * y.norm())) / 2
        k = ((combined - sims.min()) / (sims.max() - sims.min()) - (abs(alpha) if calcmode == "cosineA" else alpha)).clip(0, 1)
        return torch.lerp(b.float(), a.float(), k).to(a.dtype)
    if calcmode == "trainDifference":
        if torch.equal(b.float(), c.float()):
            return a
        diff = b.float() - c.float()
        total = diff.abs() + (b.float() - a.float()).abs()
        scale = torch.where(total != 0, (b.float() - a.float()).abs() / total, torch.tensor(0.0))
        return a + torch.sign(diff) * scale.abs() * diff.abs() * (alpha * 1.8)
    if calcmode == "smoothAdd":
        d = (b.float() - c.float()).to(b.dtype)
        filtered = scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(d.float().numpy(), size=3), sigma=1)
        return a + alpha * torch.tensor(filtered)
    if calcmode == "extract":
        x, y = b.float() - a.float(), c.float() - a.float()
        cos = F.cosine_similarity(x, y, -1).clamp(-1, 1).unsqueeze(-1)
        d = ((cos + 1) / 2) ** gamma
        return (a.float() + torch.lerp(x, y, alpha) * torch.lerp(d, 1 - d, beta)).to(a.dtype)
    if calcmode == "self":
        return a * alpha
    raise AssertionError(calcmode)


SKIPS = {"cosineA": ("first_stage_model",), "cosineB": ("first_stage_model",), "self": ("to_out", "proj_out", "norm")}
TOLERANCE = {"smoothAdd": 2e-3}  # the original rounds B - C to fp16 before filtering; we keep fp32


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("mode, calcmode", [
    ("Weight sum", "cosineA"), ("Weight sum", "cosineB"), ("Add difference", "trainDifference"),
    ("Add difference", "smoothAdd"), ("Add difference", "extract"), ("Weight sum", "self"),
])
def test_whole_merge_matches_the_original(tmp_path, family, mode, calcmode):
    a, b, c = _write(tmp_path, family)
    alpha, beta, gamma = 0.35, 0.4, 0.5
    recipe = Recipe(model_a=str(a), model_b=str(b), model_c=str(c), mode=mode, calcmode=calcmode,
                    alpha=alpha, beta=beta, gamma=gamma)
    merge_to_file(recipe, tmp_path / "out.safetensors")
    out, sa, sb, sc = (_load(p) for p in (tmp_path / "out.safetensors", a, b, c))
    sims = _original_cosine_stats(sa, sb, calcmode) if calcmode.startswith("cosine") else None
    layout = "sdxl" if family == "sdxl" else "sd1"
    for key in sa:
        merged = ("model" in key and ("weight" in key or "bias" in key) and block_of(key, layout) is not None
                  and not any(part in key for part in SKIPS.get(calcmode, ())))
        expected = _original_key(calcmode, sa[key], sb[key], sc[key], alpha, beta, gamma, sims) if merged else sa[key]
        expected = expected.to(sa[key].dtype)  # we keep A's dtype (the original may widen to fp32)
        assert out[key].dtype == sa[key].dtype
        assert torch.allclose(out[key].float(), expected.float(), atol=TOLERANCE.get(calcmode, 0), rtol=1e-3), key


@pytest.mark.parametrize("mode, calcmode", [(m, c) for m in ("Weight sum", "Add difference") for c in calcmodes_for(m)])
def test_every_calcmode_runs_on_sd1_and_keeps_a_for_untouched_keys(tmp_path, mode, calcmode):
    a, b, c = _write(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b), model_c=str(c), mode=mode, calcmode=calcmode, alpha=0.3, beta=0.2,
                    seed=11)
    result = merge_to_file(recipe, tmp_path / "out.safetensors")
    out, sa = _load(tmp_path / "out.safetensors"), _load(a)
    assert list(out) == list(sa)
    assert all(torch.isfinite(t).all() for t in out.values() if t.is_floating_point())
    assert torch.equal(out["alphas_cumprod"], sa["alphas_cumprod"])
    assert result.plan.recipe.seed == 11


def test_extract_bounds_are_checked_before_any_work(tmp_path):
    a, b, c = _write(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b), model_c=str(c), mode="Add difference", calcmode="extract", alpha=1.5)
    with pytest.raises(RecipeError, match="extract needs 0.0 ≤ alpha ≤ 1.0; got alpha = 1.5"):
        merge_to_file(recipe, tmp_path / "out.safetensors")
    with pytest.raises(RecipeError, match="gamma"):
        merge_to_file(recipe.with_changes(alpha=0.5, gamma=-1), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_plus_random_records_its_seed_and_replays(tmp_path):
    a, b, _ = _write(tmp_path, "sd1")
    recipe = Recipe(model_a=str(a), model_b=str(b), calcmode="plus random", alpha=0.1)
    first = merge_to_file(recipe, tmp_path / "one.safetensors")
    seed = first.plan.recipe.seed
    assert seed >= 0
    merge_to_file(recipe.with_changes(seed=seed), tmp_path / "two.safetensors")
    one, two = _load(tmp_path / "one.safetensors"), _load(tmp_path / "two.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_cosine_modes_stream_a_statistics_pass_first(tmp_path):
    a, b, _ = _write(tmp_path, "sd1")
    seen = []
    recipe = Recipe(model_a=str(a), model_b=str(b), calcmode="cosineB", alpha=0.2)
    result = merge_to_file(recipe, tmp_path / "out.safetensors", on_progress=lambda d, t, k: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] == len(result.plan.prepass_keys) + len(result.plan.steps)
    assert len(result.plan.prepass_keys) > 1000


def test_registry_has_every_calcmode():
    assert {method_for(m, c).name for m in ("Weight sum", "Add difference") for c in calcmodes_for(m)} <= set(METHODS)
