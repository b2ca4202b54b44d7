"""Analysis: known answers on small tensors, block sums on the real SD1.5 and SDXL key lists,
comparisons and merge read-backs end to end on tiny real-layout files, the CLI's CSV and PNG,
the header views, and the Analysis tab (built on Gradio 4 and 3.41, handlers called directly)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from mergers.analysis import compare_merge, compare_models, csv_text, element_rows, metadata_view, recipe_lines, stats
from mergers.analysis.chart import RAMP, axis_range, draw_bars, draw_heatmap, nice_step, ramp_colour, render_chart
from mergers.analysis.compare import KeyResult, analysis_block, build_comparison, component_of
from mergers.analysis.stats import PairSums, fit_sums, pair_sums
from mergers.arch import block_ids, block_of, key_specs
from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.demo import tiny_state_dict
from mergers.errors import ArchitectureError, CheckpointError, MergeCancelled, MergeError
from mergers.merge import merge_to_file
from mergers.recipe import Recipe
from mergers.weights import parse_weights
from mergers.writer import save_checkpoint
from tests.gradio3 import run_under_gradio3

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = ("mergers.analysis_cli",)
TAB = (("Analysis", "mergers.ui.analysis_tab:analysis_tab"),)
TSV_COMPONENTS = {"clip_l": "text encoder", "clip_g": "text encoder", "diffuser": "U-Net", "vae": "VAE"}


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1.5-layout files (EMA and buffers included): a, b, a negated, an inpainting a, an SDXL."""
    folder = tmp_path_factory.mktemp("analysis")
    a = tiny_state_dict("sd1", seed=1, optional=True)
    files = {"a": a, "b": tiny_state_dict("sd1", seed=2, optional=True),
             "neg": {k: -v if v.is_floating_point() else v for k, v in a.items()},
             "inpaint": tiny_state_dict("sd1", seed=3, in_channels=9), "xl": tiny_state_dict("sdxl", seed=4)}
    paths = {}
    for name, tensors in files.items():
        paths[name] = folder / f"{name}.safetensors"
        save_checkpoint(paths[name], tensors)
    return paths


# --- known answers on small tensors ------------------------------------------------------------

def test_identical_tensors_are_cosine_one_and_distance_zero():
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float16)
    sums = pair_sums(a, a.clone())
    assert sums.cosine == 1.0 and sums.relative_l2 == 0.0
    assert sums.norm_a == sums.norm_b == pytest.approx(math.sqrt(1 + 4 + 9 + 0.25))


def test_negated_tensors_are_cosine_minus_one_and_distance_two():
    a = torch.tensor([1.0, -2.0, 3.0])
    sums = pair_sums(a, -a)
    assert sums.cosine == pytest.approx(-1.0, abs=1e-12) and sums.relative_l2 == pytest.approx(2.0)


def test_hand_computed_cosine_and_distance():
    # A = (3, 4), B = (4, 3): A·B = 24, |A| = |B| = 5, |A-B| = sqrt(2)
    sums = pair_sums(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0]))
    assert sums.cosine == pytest.approx(24 / 25) and sums.relative_l2 == pytest.approx(math.sqrt(2) / 5)
    assert pair_sums(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])).cosine == 0.0


def test_zero_tensors():
    zero = torch.zeros(4)
    assert pair_sums(zero, zero).cosine == 1.0 and pair_sums(zero, zero).relative_l2 == 0.0
    one_sided = pair_sums(zero, torch.ones(4))
    assert one_sided.cosine == 0.0 and one_sided.relative_l2 == 1.0


def test_chunked_sums_match_one_float64_pass(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 7)  # many chunks, a ragged last one
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 9, generator=generator), torch.randn(5, 9, generator=generator)
    sums = pair_sums(a.half(), b.half())
    x, y = a.half().double().flatten(), b.half().double().flatten()
    assert sums.ab == pytest.approx(float(x @ y), rel=1e-6) and sums.count == 45
    assert sums.dd == pytest.approx(float((x - y) @ (x - y)), rel=1e-6)


def test_sums_add_up_to_the_sums_of_the_joined_tensors():
    a1, b1, a2, b2 = torch.arange(4.0), torch.ones(4), torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    joined = pair_sums(torch.cat([a1, a2]), torch.cat([b1, b2]))
    added = pair_sums(a1, b1) + pair_sums(a2, b2)
    assert added.cosine == pytest.approx(joined.cosine) and added.relative_l2 == pytest.approx(joined.relative_l2)


def test_fit_reads_back_the_ratio_of_a_weight_sum():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    fit = fit_sums(a, b, torch.lerp(a, b, 0.3))
    assert fit.coefficient == pytest.approx(0.3, abs=1e-6) and fit.alignment == pytest.approx(1.0, abs=1e-6)
    assert fit_sums(a, b, a).coefficient == 0.0 and fit_sums(a, b, a).alignment is None
    assert fit_sums(a, a, b).coefficient is None  # B = A: no direction to measure along


def test_fit_of_a_merge_off_the_line():
    # A = 0, B = (1, 0), M = (0.5, 0.5): t = 0.5, cos(M-A, B-A) = 1/sqrt(2)
    fit = fit_sums(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert fit.coefficient == pytest.approx(0.5) and fit.alignment == pytest.approx(1 / math.sqrt(2))


# --- blocks and components on the real key lists -------------------------------------------------

def _cosine_sums(cosine: float) -> PairSums:
    """Sums of two unit vectors with this cosine."""
    return PairSums(aa=1.0, bb=1.0, ab=cosine, dd=2.0 - 2.0 * cosine, count=1)


def _real_key_results(family: str, layout: str) -> list[KeyResult]:
    specs = [s for s in key_specs(family) if not s.optional and s.component in TSV_COMPONENTS]
    return [KeyResult(s.key, analysis_block(s.key, layout), component_of(s.key), s.shape,
                      _cosine_sums(((i * 37) % 101) / 100.0 - 0.5)) for i, s in enumerate(specs)]


@pytest.mark.parametrize("family, layout", [("sd1", "sd1"), ("sdxl", "sdxl")])
def test_every_real_key_lands_in_its_block_and_component(family, layout):
    results = _real_key_results(family, layout)
    result = build_comparison(results, models=["a", "b"], architecture=family, layout=layout)
    assert [row["name"] for row in result.blocks] == [*block_ids(layout), "VAE"]  # every block has keys
    for row in result.blocks:
        members = [r for r in results if r.block == row["name"]]
        cosines = [r.sums.cosine for r in members]
        assert row["keys"] == len(members)
        assert row["cosine"] == pytest.approx(statistics.fmean(cosines)) and row["cosine_min"] == min(cosines)
    specs = {s.key: s for s in key_specs(family)}
    for r in results:
        assert r.component == TSV_COMPONENTS[specs[r.key].component]
        if r.component == "U-Net":
            assert r.block == block_of(r.key, layout)
        assert r.block == ("VAE" if r.component == "VAE" else r.block)
    counts = {row["name"]: row["keys"] for row in result.components}
    assert counts == {c: sum(r.component == c for r in results) for c in ("text encoder", "U-Net", "VAE")}


def test_sd1_attn2_value_is_the_blocks_attn2_to_out_cosine():
    results = _real_key_results("sd1", "sd1")
    result = build_comparison(results, models=["a", "b"], architecture="SD1.x", layout="sd1")
    rows = {row["name"]: row for row in result.blocks}
    for block in ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))):
        attn2 = [r for r in results if r.block == block and r.key.endswith("attn2.to_out.0.weight")]
        assert len(attn2) == 1 and rows[block]["cosine_attn2"] == attn2[0].sums.cosine
    assert rows["IN00"]["cosine_attn2"] is None and rows["OUT00"]["cosine_attn2"] is None


def test_known_block_assignments():
    assert analysis_block("model.diffusion_model.out.2.weight", "sd1") == "OUT11"
    assert analysis_block("model.diffusion_model.time_embed.0.weight", "sd1") == "IN00"
    assert analysis_block("first_stage_model.decoder.conv_in.weight", "sd1") == "VAE"
    assert analysis_block("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1") == "BASE"
    assert analysis_block("model.diffusion_model.out.2.weight", "sdxl") == "OUT08"
    assert analysis_block("conditioner.embedders.1.model.text_projection", "sdxl") == "BASE"
    assert component_of("model_ema.diffusion_modelinput_blocks00weight") is None


# --- whole files ---------------------------------------------------------------------------------

def test_a_model_against_itself(sd1_files):
    result = compare_models(sd1_files["a"], sd1_files["a"], by="key")
    assert {row["cosine"] for row in result.rows} == {1.0} and {row["relative_l2"] for row in result.rows} == {0.0}
    assert all(row["cosine"] == 1.0 and row["cosine_min"] == 1.0 for row in result.blocks)
    assert len(result.keys) == 1130  # every U-Net, text encoder and VAE tensor of SD1.5


def test_a_model_against_its_negation(sd1_files):
    result = compare_models(sd1_files["a"], sd1_files["neg"])
    assert all(row["cosine"] == pytest.approx(-1.0) and row["relative_l2"] == pytest.approx(2.0)
               for row in result.rows + result.components)


def test_to_dict_is_json_and_says_what_was_left_out(sd1_files):
    data = compare_models(sd1_files["a"], sd1_files["b"]).to_dict()
    data = json.loads(json.dumps(data, allow_nan=False))
    assert (data["model_a"], data["model_b"], data["architecture"], data["by"]) == (
        "a.safetensors", "b.safetensors", "SD1.x", "block")
    assert [row["name"] for row in data["rows"]] == [*block_ids("sd1"), "VAE"]
    assert {"cosine", "relative_l2", "cosine_min", "cosine_attn2", "norm_a", "norm_b"} <= set(data["rows"][0])
    assert [c["name"] for c in data["components"]] == ["text encoder", "U-Net", "VAE"]
    reasons = {s["key"]: s["reason"] for s in data["skipped"]}
    assert "int64" in reasons["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert "EMA" in reasons["model_ema.decay"]


def test_keys_of_another_shape_are_left_out_by_name(sd1_files):
    result = compare_models(sd1_files["inpaint"], sd1_files["a"])
    reasons = dict(result.skipped)
    assert "[10, 9, 3, 3]" in reasons["model.diffusion_model.input_blocks.0.0.weight"]
    assert len(result.keys) == 1129


def test_a_weight_sum_reads_back_its_alpha_per_block(sd1_files, tmp_path):
    merged = tmp_path / "m.safetensors"
    merge_to_file(Recipe(model_a=str(sd1_files["a"]), model_b=str(sd1_files["b"]), alpha=0.3), merged)
    result = compare_merge(sd1_files["a"], sd1_files["b"], merged)
    assert result.model_merged == "m.safetensors"
    for row in result.blocks:
        assert row["coefficient"] == pytest.approx(0.3, abs=2e-3), row["name"]  # fp16 output rounding
        assert row["alignment"] == pytest.approx(1.0, abs=1e-3)


def test_block_weights_read_back_per_block(sd1_files, tmp_path):
    merged = tmp_path / "gradv.safetensors"
    merge_to_file(Recipe(model_a=str(sd1_files["a"]), model_b=str(sd1_files["b"]), weights_alpha="GRAD_V"), merged)
    weights = dict(zip(block_ids("sd1"), parse_weights("GRAD_V", "sd1").values))
    result = compare_merge(sd1_files["a"], sd1_files["b"], merged, by="block")
    for row in result.blocks:
        expected = weights["BASE" if row["name"] == "VAE" else row["name"]]
        assert row["coefficient"] == pytest.approx(expected, abs=2e-3), row["name"]


def test_progress_reaches_the_total_and_cancel_stops(sd1_files):
    seen = []
    compare_models(sd1_files["a"], sd1_files["b"], on_progress=lambda done, total, key: seen.append((done, total)))
    assert seen[-1] == (1130, 1130) and len(seen) == 1130

    class Cancel:
        def __init__(self):
            self.calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 5

    with pytest.raises(MergeCancelled, match="after 5 of 1130"):
        compare_models(sd1_files["a"], sd1_files["b"], cancel=Cancel())


def test_errors_name_what_is_wrong(sd1_files, tmp_path):
    with pytest.raises(ArchitectureError, match=r"a\.safetensors is SD1\.x but xl\.safetensors is SDXL"):
        compare_models(sd1_files["a"], sd1_files["xl"])
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        compare_models(sd1_files["a"], tmp_path / "missing.safetensors")
    with pytest.raises(MergeError, match="by='blocks'"):
        compare_models(sd1_files["a"], sd1_files["b"], by="blocks")


def test_sdxl_blocks(sd1_files):
    result = compare_models(sd1_files["xl"], sd1_files["xl"])
    assert [row["name"] for row in result.blocks] == [*block_ids("sdxl"), "VAE"]
    assert result.architecture == "SDXL base"


# --- CSV, charts ---------------------------------------------------------------------------------

def test_csv_text():
    text = csv_text([{"name": "IN00", "cosine": 0.123456789012, "shape": [320, 4]}, {"name": "M00", "cosine": None}])
    assert list(csv.reader(io.StringIO(text))) == [["name", "cosine", "shape"], ["IN00", "0.12345679", "320x4"],
                                                    ["M00", "", ""]]


def test_axis_and_colours():
    assert nice_step(0.0036) == 0.005 and nice_step(0.2) == pytest.approx(0.2) and nice_step(7) == 10
    low, high, step = axis_range([0.981, 0.999])
    assert (low, high, step) == pytest.approx((0.98, 1.0, 0.005))
    low, high, _ = axis_range([-1.0, 1.0])
    assert low <= -1.0 and high >= 1.0
    assert axis_range([0.5])[0] < 0.5 < axis_range([0.5])[1]
    assert ramp_colour(0.0) == RAMP[0] and ramp_colour(1.0) == RAMP[-1] and ramp_colour(2.0) == RAMP[-1]


def test_bar_chart_has_one_slot_per_row_and_tolerates_gaps():
    rows = [{"name": f"IN{i:02d}", "cosine": 0.99 + i / 1000} for i in range(5)] + [{"name": "M00", "cosine": None}]
    wide, two, one = draw_bars(rows, "cosine"), draw_bars(rows[:2], "cosine"), draw_bars(rows[:1], "cosine")
    slot = two.width - one.width
    assert slot >= 40 and wide.width - two.width == 4 * slot and wide.height == one.height
    assert draw_heatmap(rows, ("cosine",)).width > 0


def test_charts_of_a_comparison(sd1_files):
    result = compare_models(sd1_files["a"], sd1_files["b"])
    bars, heat = render_chart(result, "relative_l2"), render_chart(result, kind="heatmap")
    assert bars.mode == heat.mode == "RGB" and bars.width > 27 * 40
    assert len(set(bars.getdata())) > 10  # something was drawn, in several colours
    with pytest.raises(ValueError, match="unknown chart"):
        render_chart(result, kind="pie")


# --- the CLI -------------------------------------------------------------------------------------

def test_cli_writes_a_csv_and_a_png_that_open(sd1_files, tmp_path, capsys):
    out_csv, out_png = tmp_path / "ab.csv", tmp_path / "ab.png"
    code = main(["analyze", str(sd1_files["a"]), str(sd1_files["b"]), "--csv", str(out_csv), "--plot", str(out_png)],
                command_modules=CLI_MODULES)
    assert code == 0
    printed = capsys.readouterr().out
    assert "SD1.x: a.safetensors vs b.safetensors" in printed and "OUT11" in printed and "U-Net" in printed
    rows = list(csv.DictReader(out_csv.open(encoding="utf-8")))
    assert [row["name"] for row in rows] == [*block_ids("sd1"), "VAE"]
    assert -1.0 <= float(rows[0]["cosine"]) <= 1.0
    with Image.open(out_png) as image:
        image.load()
        assert image.format == "PNG" and image.width > 27 * 40


def test_cli_by_key_with_merge_and_heatmap(sd1_files, tmp_path, capsys):
    merged = tmp_path / "m.safetensors"
    merge_to_file(Recipe(model_a=str(sd1_files["a"]), model_b=str(sd1_files["b"]), alpha=0.7), merged)
    out_csv, out_png = tmp_path / "keys.csv", tmp_path / "heat.png"
    assert main(["analyze", str(sd1_files["a"]), str(sd1_files["b"]), "--merged", str(merged), "--by", "key",
                 "--csv", str(out_csv), "--plot", str(out_png), "--chart", "heatmap", "--json"],
                command_modules=CLI_MODULES) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["by"] == "key" and len(data["rows"]) == 1130 and data["model_merged"] == "m.safetensors"
    rows = list(csv.DictReader(out_csv.open(encoding="utf-8")))
    assert float(rows[0]["coefficient"]) == pytest.approx(0.7, abs=5e-3) and "x" in rows[0]["shape"]
    with Image.open(out_png) as image:
        assert image.format == "PNG"


def test_cli_refuses_what_cannot_work(sd1_files, tmp_path, capsys):
    assert main(["analyze", str(sd1_files["a"]), str(sd1_files["b"]), "--stat", "coefficient"],
                command_modules=CLI_MODULES) == 2
    assert "--stat coefficient needs --merged" in capsys.readouterr().err
    assert main(["analyze", str(sd1_files["a"]), str(sd1_files["b"]), "--csv", str(sd1_files["b"])],
                command_modules=CLI_MODULES) == 2
    assert "is one of the input models" in capsys.readouterr().err


# --- header views --------------------------------------------------------------------------------

def test_elements_list_and_search(sd1_files):
    with open_checkpoint(sd1_files["xl"]) as ckpt:
        rows = element_rows(ckpt, "attn2 OUT.0 weight input_blocks.4.1.transformer_blocks.1")
        everything = element_rows(ckpt)
    assert len(everything) == len(ckpt)
    wanted = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_out.0.weight"
    assert [row[3] for row in rows] == [wanted]
    _, block, component, _, shape, dtype = rows[0]
    assert (block, component, dtype) == ("IN04", "U-Net", "float16") and "x" in shape


def test_metadata_and_recipe_views(sd1_files, tmp_path):
    merged = tmp_path / "gradv.safetensors"
    merge_to_file(Recipe(model_a=str(sd1_files["a"]), model_b=str(sd1_files["b"]), weights_alpha="GRAD_V",
                         prune=True), merged)
    with open_checkpoint(merged) as ckpt:
        lines = recipe_lines(ckpt.metadata, "sd1")
        view = metadata_view(ckpt.metadata)
    assert lines[0].startswith("Weight sum")
    assert lines[1].startswith("model A: a.safetensors (sha256 ") and lines[2].startswith("model B: b.safetensors")
    assert lines[3].startswith("alpha by block: BASE:0, IN00:1,") and "prune: True" in lines
    assert view["sd_merge_recipe"]["type"] == "sd-webui-supermerger" and view["format"] == "pt"
    a1111 = recipe_lines({"sd_merge_recipe": json.dumps({"type": "sd-webui-supermerger", "mode": "Weight sum",
                                                         "calcmode": "normal", "model_c": ""})}, None)
    assert a1111 == ["type: sd-webui-supermerger", "mode: Weight sum", "calcmode: normal"]
    assert recipe_lines({}, "sd1") == [] and metadata_view({"x": "{not json"}) == {"x": "{not json"}


# --- the tab -------------------------------------------------------------------------------------

@pytest.fixture
def tab_session(tmp_path):
    pytest.importorskip("gradio")
    from mergers.session import MergeSession
    from tests.ui_host import UiHost
    return MergeSession(UiHost.create(tmp_path))


@pytest.fixture
def tab_actions(tab_session, tmp_path, monkeypatch):
    from mergers.ui import analysis_tab
    monkeypatch.setattr(analysis_tab, "EXPORT_DIR", tmp_path / "exports")  # the CSV downloads
    return analysis_tab.AnalysisActions(tab_session)


def _titles(actions) -> dict[str, str]:
    return {Path(t.split(" [")[0]).stem: t for t in actions.model_titles()}


def test_the_analysis_tab_builds(tab_session):
    import gradio as gr

    from mergers.ui.tab import tab_contents
    with gr.Blocks() as page:
        tab_contents(tab_session, feature_tabs=TAB)
    labels = {getattr(block, "label", None) for block in page.blocks.values()}
    assert {"Blocks", "Per key", "Elements", "safetensors metadata", "Chart shows"} <= labels


def test_the_analysis_tab_builds_under_gradio_3(tmp_path):
    assert run_under_gradio3(GRADIO3_BUILD, tmp_path, folder=tmp_path).endswith("gradio 3.41.2 ok")


# Gradio 3.41.2 warns about arguments it does not know ("unused kwarg"): fail on any. The handlers run too.
GRADIO3_BUILD = '''
import sys, warnings
from pathlib import Path
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import gradio as gr
    from tests.ui_host import UiHost
    from mergers.session import MergeSession
    from mergers.ui.tab import tab_contents
    from mergers.ui.analysis_tab import AnalysisActions, IMAGE, MODEL_A, MODEL_B
    session = MergeSession(UiHost.create(Path(sys.argv[1])))
    with gr.Blocks():
        tab_contents(session, feature_tabs=(("Analysis", "mergers.ui.analysis_tab:analysis_tab"),))
    actions = AnalysisActions(session)
    titles = actions.model_titles()
    out = actions.compare({MODEL_A: titles[0], MODEL_B: titles[1]})
    assert out[IMAGE].width > 1000, out
unknown = [str(w.message) for w in caught if "kwarg" in str(w.message)]
assert not unknown, unknown
print("gradio", gr.__version__, "ok")
'''


def test_compare_in_the_tab_gives_chart_tables_and_csv(tab_actions):
    from mergers.ui.analysis_tab import (
        CHART,
        COMPONENTS,
        DESCENDING,
        FILES,
        IMAGE,
        KEY_HEADERS,
        KEYS,
        MERGED,
        MESSAGE,
        MODEL_A,
        MODEL_B,
        RESULT,
        SEARCH,
        SORT,
        STATISTIC,
    )
    titles = _titles(tab_actions)
    out = tab_actions.compare({MODEL_A: titles["a"], MODEL_B: titles["b"], MERGED: None, STATISTIC: "cosine_min",
                               CHART: "bars"})
    assert "1130 keys compared" in out[MESSAGE] and isinstance(out[IMAGE], Image.Image)
    assert [row[0] for row in out[COMPONENTS]] == ["text encoder", "U-Net", "VAE"] and len(out[KEYS]) == 1130
    blocks_csv, keys_csv = map(Path, out[FILES])
    assert blocks_csv.parent.name == "exports" and blocks_csv.name == "a_vs_b_blocks.csv"
    assert blocks_csv.read_text(encoding="utf-8").startswith("name,keys,cosine") and len(keys_csv.read_text(encoding="utf-8").splitlines()) == 1131
    column = KEY_HEADERS.index("cosine")
    table = tab_actions.filter_keys({RESULT: out[RESULT], SEARCH: "attn2 to_out weight", SORT: "cosine",
                                     DESCENDING: True})[KEYS]
    assert len(table) == 16 and all("attn2.to_out.0.weight" in row[0] for row in table)
    assert [row[column] for row in table] == sorted((row[column] for row in table), reverse=True)
    redrawn = tab_actions.redraw({RESULT: out[RESULT], STATISTIC: "relative_l2", CHART: "heatmap"})[IMAGE]
    assert redrawn.size != out[IMAGE].size


def test_tab_errors_are_messages(tab_actions):
    from mergers.ui.analysis_tab import CHART, MESSAGE, MODEL_A, MODEL_B, RESULT, STATISTIC
    titles = _titles(tab_actions)
    assert tab_actions.compare({MODEL_A: titles["a"], MODEL_B: None})[MESSAGE] == "choose model B first"
    assert "SDXL" in tab_actions.compare({MODEL_A: titles["a"], MODEL_B: titles["xl"]})[MESSAGE]
    assert "nope.safetensors" in tab_actions.compare({MODEL_A: "nope.safetensors", MODEL_B: titles["b"]})[MESSAGE]
    assert tab_actions.redraw({RESULT: None, STATISTIC: "cosine", CHART: "bars"}) == {}


def test_tab_merge_check_and_stop(tab_actions, tmp_path):
    from mergers.ui.analysis_tab import IMAGE, MERGED, MESSAGE, MODEL_A, MODEL_B, RESULT
    folder = tab_actions.host.models_dir
    merge_to_file(Recipe(model_a=str(folder / "a.safetensors"), model_b=str(folder / "b.safetensors"), alpha=0.3),
                  folder / "ab.safetensors")
    titles = _titles(tab_actions)
    out = tab_actions.compare({MODEL_A: titles["a"], MODEL_B: titles["b"], MERGED: titles["ab"]})
    assert all(row["coefficient"] == pytest.approx(0.3, abs=2e-3) for row in out[RESULT].blocks)
    stopped = tab_actions.compare({MODEL_A: titles["a"], MODEL_B: titles["b"]},
                                  on_progress=lambda done, total, key: tab_actions.stop())
    assert "stopped after 1 of 1130" in stopped[MESSAGE] and IMAGE not in stopped


def test_tab_metadata_and_elements(tab_actions):
    from mergers.ui.analysis_tab import (
        ELEMENTS,
        ELEMENTS_MODEL,
        ELEMENTS_SEARCH,
        MESSAGE,
        META_JSON,
        META_MODEL,
        META_RECIPE,
    )
    folder = tab_actions.host.models_dir
    merge_to_file(Recipe(model_a=str(folder / "a.safetensors"), model_b=str(folder / "b.safetensors"), alpha=0.25),
                  folder / "ab.safetensors")
    titles = _titles(tab_actions)
    shown = tab_actions.show_metadata({META_MODEL: titles["ab"]})
    assert "alpha: 0.25" in shown[META_RECIPE] and "supermerger_recipe" in shown[META_JSON]
    assert tab_actions.show_metadata({META_MODEL: titles["a"]})[META_RECIPE] == "no merge recipe in this file"
    found = tab_actions.show_elements({ELEMENTS_MODEL: titles["xl"], ELEMENTS_SEARCH: "label_emb weight"})
    assert [row[3] for row in found[ELEMENTS]] == ["model.diffusion_model.label_emb.0.0.weight",
                                                  "model.diffusion_model.label_emb.0.2.weight"]
    assert found[MESSAGE] == "2 elements"
