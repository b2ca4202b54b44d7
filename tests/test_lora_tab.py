"""The LoRA tab: it builds under Gradio 4 and 3.41, and its handlers apply, save, merge and extract."""

from __future__ import annotations

import pytest
import torch

from mergers.checkpoint import open_checkpoint
from mergers.session import MergeSession
from mergers.ui import lora_tab as tab
from mergers.ui.handlers import MESSAGE
from tests.gradio3 import run_under_gradio3
from tests.test_lora_fixtures import make_lora
from tests.test_ui import plain
from tests.ui_host import UiHost, weights_checksum

FEATURE = (("LoRA", "mergers.ui.lora_tab:lora_tab"),)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny checkpoints (a, b, c: SD1; xl: SDXL) and a LoRA folder beside them, as A1111 lays them out."""
    root = tmp_path_factory.mktemp("lora_tab")
    UiHost.create(root)
    (root / "Lora").mkdir()
    make_lora(root / "Lora" / "style.safetensors", "sd1", rank=2, seed=1, only="attentions_0")
    make_lora(root / "Lora" / "other.safetensors", "sd1", rank=2, seed=2, only="attentions_0")
    make_lora(root / "Lora" / "xl.safetensors", "sdxl", rank=2, seed=3, only="input_blocks_4")
    return root


@pytest.fixture
def actions(root, tmp_path):
    return tab.LoraActions(MergeSession(UiHost(root / "models", tmp_path / "data")))


def test_the_lora_folder_is_found_beside_the_checkpoints(actions, root):
    assert tab.default_lora_folder(actions.host) == root / "Lora"
    assert tab.lora_files(root / "Lora") == ["other.safetensors", "style.safetensors", "xl.safetensors"]


def test_the_tab_builds_under_gradio_4(actions):
    import gradio as gr

    from mergers.ui.tab import tab_contents
    with gr.Blocks() as blocks:
        tab_contents(actions.session, feature_tabs=FEATURE)
    labels = {getattr(block, "label", None) for block in blocks.blocks.values()}
    assert {"LoRA folder", "LoRAs (name:ratio[:blocks], one a line)", "Tuned model"} <= labels


def test_the_tab_builds_under_gradio_3(root, tmp_path):
    out = run_under_gradio3(GRADIO3_BUILD, root / "models", tmp_path / "d", folder=tmp_path)
    assert out.startswith("gradio 3.41.2 ok")


GRADIO3_BUILD = '''
import sys, warnings
from pathlib import Path
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import gradio as gr
    from tests.ui_host import UiHost
    from mergers.session import MergeSession
    from mergers.ui.tab import tab_contents
    with gr.Blocks():
        tab_contents(MergeSession(UiHost(Path(sys.argv[1]), Path(sys.argv[2]))),
                     feature_tabs=(("LoRA", "mergers.ui.lora_tab:lora_tab"),))
unknown = [str(w.message) for w in caught if "kwarg" in str(w.message)]
assert not unknown, unknown
print("gradio", gr.__version__, "ok")
'''


def test_apply_to_the_loaded_model_and_restore(actions):
    live = actions.host.live_model()
    before = weights_checksum(live.tensors())
    outputs = actions.apply_to_loaded({tab.ENTRIES: "style:0.8:OUTALL\nother.safetensors:0.5"})
    assert "keys of the loaded model changed by style:0.8:OUTALL, other.safetensors:0.5" in plain(outputs[MESSAGE])
    assert weights_checksum(live.tensors()) != before
    assert "keys restored" in actions.restore({})[MESSAGE]
    assert weights_checksum(live.tensors()) == before


def test_apply_twice_is_the_model_plus_the_last_loras(actions):
    live = actions.host.live_model()
    actions.apply_to_loaded({tab.ENTRIES: "style:1"})
    once = weights_checksum(live.tensors())
    actions.apply_to_loaded({tab.ENTRIES: "other:1"})
    outputs = actions.apply_to_loaded({tab.ENTRIES: "style:1"})
    assert weights_checksum(live.tensors()) == once  # the tab's LoRAs replace its last ones, never pile up
    assert "(in place of other:1)" in plain(outputs[MESSAGE]) and "it now holds a, then LoRA style:1" in plain(
        outputs[MESSAGE])


def test_a_lora_of_another_model_is_a_message_and_changes_nothing(actions):
    live = actions.host.live_model()
    before = weights_checksum(live.tensors())
    outputs = actions.apply_to_loaded({tab.ENTRIES: "xl:1"})
    assert "looks made for SDXL" in plain(outputs[MESSAGE]) and "Traceback" not in outputs[MESSAGE]
    assert weights_checksum(live.tensors()) == before


def test_unknown_lora_and_missing_choices_are_messages(actions):
    assert "LoRA 'nope' is not in" in plain(actions.apply_to_loaded({tab.ENTRIES: "nope:1"})[MESSAGE])
    assert plain(actions.extract({})[MESSAGE]) == "choose the tuned model first"


def test_save_as_checkpoint_writes_into_the_models_folder(actions, root):
    outputs = actions.save_checkpoint({tab.ENTRIES: "style:1", tab.CHECKPOINT: "b.safetensors",
                                       tab.CKPT_NAME: "b_style", tab.CKPT_DTYPE: "fp16", tab.OVERWRITE: True})
    assert "wrote" in plain(outputs[MESSAGE])
    with open_checkpoint(root / "models" / "b_style.safetensors") as saved:
        assert saved.dtype("model.diffusion_model.out.2.weight") == torch.float16


def test_merge_and_extract_write_into_the_lora_folder(actions, root):
    outputs = actions.merge({tab.ENTRIES: "style:1, other:0.5", tab.MERGE_NAME: "both", tab.OVERWRITE: True})
    assert "both.safetensors" in plain(outputs[MESSAGE]) and "by concat (exact)" in plain(outputs[MESSAGE])
    outputs = actions.extract({tab.TUNED: "b.safetensors", tab.BASE: "a.safetensors", tab.EX_RANK: 2,
                               tab.EX_NAME: "b-a", tab.OVERWRITE: True})
    assert "b-a.safetensors" in plain(outputs[MESSAGE])
    assert (root / "Lora" / "b-a.safetensors").exists()


def test_picked_files_are_added_as_entries(actions):
    outputs = actions.add_picked({tab.PICK: ["style.safetensors", "xl.safetensors"], tab.ENTRIES: "xl.safetensors:1"})
    assert outputs[tab.ENTRIES] == "xl.safetensors:1\nstyle.safetensors:1"
