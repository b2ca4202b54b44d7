"""The Merge tab's block sliders follow model A's layout: SD1/SDXL, Flux, SD3 and SD3.5 Large.

Tiny Flux and SD3 checkpoints (every real diffusion key, each dimension cut to at most 8) are
picked as model A; the handlers show that layout's sliders, "Set" writes them into a weights box
in the layout's block order, "Read" puts them back, and a merge with those weights gives each
block its own ratio.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("gradio")

import gradio as gr
import torch

from mergers.arch import block_ids, key_specs
from mergers.arch.layouts import LAYOUTS
from mergers.session import MergeSession
from mergers.ui.fields import default_values
from mergers.ui.handlers import (
    GENERIC_SLIDERS,
    SLIDER_GROUPS,
    SLIDER_NAMES,
    VISIBILITY_OUTPUTS,
    TabActions,
    group_name,
    layout_sliders,
    slider_name,
    slider_visibility,
    uses_named_sliders,
)
from mergers.ui.tab import tab_contents
from mergers.writer import save_checkpoint
from tests.gradio3 import run_under_gradio3
from tests.ui_host import UiHost

DIFFUSION = "model.diffusion_model."
SD3_MEDIUM_JOINT_BLOCKS = 24
SD3_LARGE_JOINT_BLOCKS = 38
# file name → (family, seed, dtype); float32 Flux so a merged value is checked exactly against its formula.
MODELS = {"flux_a.safetensors": ("flux", 1, torch.float32), "flux_b.safetensors": ("flux", 2, torch.float32),
          "sd3.safetensors": ("sd3", 3, torch.float16), "sd35_large.safetensors": ("sd3_large", 4, torch.float16)}
FLUX_LIVE = "flux_a.safetensors"


def small_diffuser(family: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every diffusion key of ``family`` ("flux", "sd3"; "sd3_large": SD3 with 38 joint blocks),
    each dimension cut to at most 8."""
    specs = key_specs("sd3" if family == "sd3_large" else family)
    shapes = {s.key: s.shape for s in specs if s.component == "diffuser"}
    if family == "sd3_large":  # SD3.5 Large: joint blocks 24–37, shaped as block 22 (a full joint block)
        block = f"{DIFFUSION}joint_blocks.22."
        shapes |= {key.replace(block, f"{DIFFUSION}joint_blocks.{n}."): shape for key, shape in shapes.items()
                   if key.startswith(block) for n in range(SD3_MEDIUM_JOINT_BLOCKS, SD3_LARGE_JOINT_BLOCKS)}
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(tuple(min(n, 8) for n in shape), generator=generator).to(dtype)
            for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("layouts") / "models"
    folder.mkdir()
    for name, (family, seed, dtype) in MODELS.items():
        save_checkpoint(folder / name, small_diffuser(family, seed, dtype))
    return folder


@pytest.fixture
def host(models_dir, tmp_path, monkeypatch) -> UiHost:
    """A host whose loaded model is the tiny Flux model A, so a Flux merge swaps into it."""
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    return UiHost(models_dir, tmp_path / "data", live_from=FLUX_LIVE)


@pytest.fixture
def actions(host) -> TabActions:
    return TabActions(MergeSession(host))


def title(actions: TabActions, file_name: str) -> str:
    return next(t for t in actions.model_titles() if t.startswith(file_name + " "))


def shown_blocks(visible: dict[str, bool]) -> set[str]:
    """The blocks whose slider a user sees: its group is shown and so is the slider."""
    return {b for group, blocks in SLIDER_GROUPS if visible[group_name(group)]
            for b in blocks if visible[slider_name(b)]}


def apply_updates(visible: dict[str, bool], outputs: dict) -> dict[str, bool]:
    """The components' visibility after a handler's outputs (an output it leaves out stays as it was)."""
    return {**visible, **{name: outputs[name]["visible"] for name in VISIBILITY_OUTPUTS if name in outputs}}


def plain(message: str) -> str:
    return re.sub(r"\\(.)", r"\1", message)


# --- the sliders and their groups ---------------------------------------------------------------


def test_every_block_of_every_layout_has_one_slider():
    # Named sliders for SD1/SDXL, Flux and SD3; the positional pool for every other layout (#17).
    assert len(SLIDER_NAMES) == len(set(SLIDER_NAMES)) == 26 + 4 + 19 + 38 + 38 + GENERIC_SLIDERS
    for layout, blocks in LAYOUTS.items():
        sliders = layout_sliders(layout)
        assert len(sliders) == len(blocks) and set(sliders) <= set(SLIDER_NAMES), layout
        assert uses_named_sliders(layout) == (layout in ("sd1", "sdxl", "flux", "sd3", "sd3_large")), layout


def test_a_new_layout_relabels_the_positional_sliders():
    updates = slider_visibility("qwen_image")
    assert updates["block_group.any"]["visible"] and not updates["block_group.unet"]["visible"]
    assert updates["block.#002"]["label"] == "T00" and updates["block.#002"]["visible"]
    assert not updates["block.#063"]["visible"]  # Qwen-Image has 63 blocks


@pytest.fixture
def built(host) -> dict:
    """The Merge tab's components by name (no feature tabs: only the Merge tab is looked at)."""
    with gr.Blocks():
        return tab_contents(MergeSession(host), feature_tabs=())


def test_the_tab_starts_with_the_sd1_sliders_and_lays_the_transformer_blocks_in_columns(built):
    visible = {name: built[name].visible for name in VISIBILITY_OUTPUTS}
    assert shown_blocks(visible) == set(block_ids("sd1"))
    for group, blocks in SLIDER_GROUPS[2:]:  # Flux double and single, SD3 and SD3.5 Large joint: four columns each
        columns = {id(built[slider_name(b)].parent) for b in blocks}
        assert len(columns) == 4, group
    assert [built[slider_name(b)].label for b in ("D00", "S37", "J23", "CLIP")] == ["D00", "S37", "J23", "CLIP"]


def test_each_layout_shows_exactly_its_sliders_whatever_came_before():
    visible = {name: True for name in SLIDER_NAMES} | {group_name(g): g == "unet" for g, _ in SLIDER_GROUPS}
    for layout in ("sd3_large", "sd3", "flux", "sdxl", "sd3_large", "sd1", "flux", "sd3"):
        visible = apply_updates(visible, slider_visibility(layout))
        assert shown_blocks(visible) == set(block_ids(layout)), layout


# --- model A picks the layout ---------------------------------------------------------------------


def test_a_flux_model_a_shows_the_flux_sliders(actions, built):
    outputs = actions.change_model_a({"model_a": title(actions, "flux_a.safetensors"), "include_exclude_blocks": []})
    assert outputs["layout"] == "flux" and "Flux" in outputs["arch_info"]
    visible = apply_updates({name: built[name].visible for name in VISIBILITY_OUTPUTS}, outputs)
    assert shown_blocks(visible) == set(block_ids("flux"))
    assert visible[group_name("unet")] is False  # BASE, IN00…, M00, OUT00… go with their group
    assert not shown_blocks(visible) & {"BASE", "IN00", "M00", "OUT11"}


@pytest.mark.parametrize("file_name,layout,joint_blocks", [("sd3.safetensors", "sd3", 24),
                                                          ("sd35_large.safetensors", "sd3_large", 38)])
def test_an_sd3_model_a_shows_its_joint_blocks(actions, built, file_name, layout, joint_blocks):
    outputs = actions.change_model_a({"model_a": title(actions, file_name), "include_exclude_blocks": []})
    assert outputs["layout"] == layout
    visible = apply_updates({name: built[name].visible for name in VISIBILITY_OUTPUTS}, outputs)
    shown = shown_blocks(visible)
    assert shown == set(block_ids(layout))
    assert sum(b.startswith("J") for b in shown) == joint_blocks and not {"D00", "S00", "BASE"} & shown


# --- Set, Read and a merge with Flux block weights ----------------------------------------------------


def flux_slider_values() -> dict[str, float]:
    """A different ratio on each Flux slider (0.1, 0.11, …) and 0 on every other slider."""
    ratios = {slider_name(b): round(0.1 + i / 100, 3) for i, b in enumerate(block_ids("flux"))}
    return {**{name: 0.0 for name in SLIDER_NAMES}, **ratios}


def test_set_and_read_flux_weights(actions):
    sliders = flux_slider_values()
    text = actions.set_weights({**sliders, "layout": "flux"}, target="weights_alpha")["weights_alpha"]
    numbers = [float(n) for n in text.split(",")]
    assert numbers == [sliders[slider_name(b)] for b in block_ids("flux")] and len(numbers) == 61
    assert numbers[block_ids("flux").index("D03")] == 0.16
    read = actions.read_weights({"weights_alpha": text, "layout": "flux"}, source="weights_alpha")
    assert read == {slider_name(b): sliders[slider_name(b)] for b in block_ids("flux")}
    readable = actions.read_weights({"weights_alpha": "ALL:0.2, D:0.7, OUT:1", "layout": "flux"},
                                    source="weights_alpha")
    assert (readable["block.D18"], readable["block.S00"], readable["block.OUT"]) == (0.7, 0.2, 1.0)


def test_the_sd1_box_is_refused_for_flux_with_a_message(actions):
    outputs = actions.read_weights({"weights_alpha": default_values()["weights_alpha"], "layout": "flux"},
                                   source="weights_alpha")
    assert set(outputs) == {"message"} and "61" in plain(outputs["message"])


def test_flux_block_weights_from_the_sliders_merge_each_block_with_its_ratio(actions, host, models_dir):
    sliders = flux_slider_values()
    text = actions.set_weights({**sliders, "layout": "flux"}, target="weights_alpha")["weights_alpha"]
    a = small_diffuser("flux", 1, torch.float32)
    b = small_diffuser("flux", 2, torch.float32)
    values = {**default_values(), "model_a": title(actions, "flux_a.safetensors"),
              "model_b": title(actions, "flux_b.safetensors"), "use_block_weights": True, "weights_alpha": text}
    outputs = actions.merge(values)
    assert "keys merged" in plain(outputs["message"]), outputs["message"]
    live = host.live_model().tensors()
    for key, block in ((f"{DIFFUSION}double_blocks.3.img_attn.qkv.weight", "D03"),
                       (f"{DIFFUSION}single_blocks.10.linear1.weight", "S10"), (f"{DIFFUSION}img_in.weight", "IN")):
        ratio = sliders[slider_name(block)]
        expected = (1 - ratio) * a[key] + ratio * b[key]
        assert torch.allclose(live[key].float(), expected, atol=1e-6), (key, block, ratio)
    assert sliders[slider_name("D03")] == 0.16


# --- Gradio 3.41: the same tab built, and model A's change run through Gradio's own event --------------


def test_model_a_change_runs_through_gradio_3(models_dir, tmp_path):
    out = run_under_gradio3(GRADIO3_EVENT, models_dir, tmp_path / "d", folder=tmp_path,
                            env={"SUPERMERGER_CACHE": str(tmp_path / "cache")})
    assert out.endswith("gradio 3.41.2 ok"), out


# Gradio 3.41 passes an update of a Column (a slider group) as it does a slider's; an argument it does
# not know is only a warning there ("unused kwarg"): fail on it.
GRADIO3_EVENT = '''
import asyncio, sys, warnings
from pathlib import Path
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import gradio as gr
    from tests.ui_host import UiHost
    from mergers.session import MergeSession
    from mergers.ui.tab import tab_contents
    from mergers.ui.handlers import group_name, slider_name
    host = UiHost(Path(sys.argv[1]), Path(sys.argv[2]), live_from="flux_a.safetensors")
    with gr.Blocks() as demo:
        w = tab_contents(MergeSession(host), feature_tabs=())
unknown = [str(w.message) for w in caught if "kwarg" in str(w.message)]
assert not unknown, unknown
names = {component._id: name for name, component in w.items()}
index, dependency = next((i, d) for i, d in enumerate(demo.config["dependencies"])
                         if d["targets"] == [w["model_a"]._id] and d["trigger"] == "change")
values = {"model_a": next(t for t in host.list_models() if t.path.name == "flux_a.safetensors").title,
          "include_exclude_blocks": []}
result = asyncio.run(demo.process_api(index, [values[names[i]] for i in dependency["inputs"]], state={}))
outputs = dict(zip((names[i] for i in dependency["outputs"]), result["data"]))
assert outputs[group_name("unet")]["visible"] is False, outputs[group_name("unet")]
assert outputs[group_name("flux_single")]["visible"] is True and outputs[slider_name("S37")]["visible"] is True
assert outputs[group_name("sd3_joint")]["visible"] is False
print("gradio", gr.__version__, "ok")
'''


def test_a_qwen_image_model_a_relabels_the_positional_sliders_and_set_reads_them(actions, built, models_dir):
    from mergers.weights import parse_weights
    from tests.arch_keys import qwen_image  # issue #17: a layout without named sliders

    save_checkpoint(models_dir / "qwen.safetensors", {k: torch.zeros(s) for k, s in qwen_image().items()})
    outputs = actions.change_model_a({"model_a": title(actions, "qwen.safetensors"), "include_exclude_blocks": []})
    assert outputs["layout"] == "qwen_image" and "Qwen-Image" in outputs["arch_info"]
    visible = apply_updates({name: built[name].visible for name in VISIBILITY_OUTPUTS}, outputs)
    shown = shown_blocks(visible)
    assert len(shown) == 63 and visible[group_name("any")] and not visible[group_name("unet")]
    assert outputs["block.#062"]["label"] == "OUT"
    sliders = {**{name: 0.0 for name in SLIDER_NAMES}, **{name: 1.0 for name in layout_sliders("qwen_image")[2:62]}}
    text = actions.set_weights({**sliders, "layout": "qwen_image"}, target="weights_alpha")["weights_alpha"]
    assert parse_weights(text, "qwen_image").as_readable() == "TE:0, IN:0, T00-T59:1, OUT:0"
    read = actions.read_weights({"weights_alpha": "ALL:0.5, T10:1", "layout": "qwen_image"}, source="weights_alpha")
    assert read["block.#012"] == 1.0 and read["block.#000"] == 0.5
