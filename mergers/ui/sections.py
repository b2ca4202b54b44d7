"""The tab's sections: one small builder each, filling a dict of named components.

Declared fields are made by :func:`component` from their declaration in
:mod:`mergers.ui.fields`; the rest (buttons, outputs, sliders) are named with
the constants of :mod:`mergers.ui.handlers`. Only arguments that Gradio 3.41
and Gradio 4 both take are used.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from mergers.host import GenerationParams
from mergers.methods.modes import method_for
from mergers.ui.fields import FIELDS_BY_NAME, GENERATION_FIELDS, ui_from_params
from mergers.ui.handlers import (
    ALLOW_NON_FINITE,
    ARCH_INFO,
    GALLERY,
    HISTORY,
    HISTORY_HEADERS,
    HISTORY_ID,
    HISTORY_MATCH,
    HISTORY_RECIPE,
    HISTORY_SEARCH,
    INFOTEXT,
    MESSAGE,
    METHOD_INFO,
    OVERWRITE,
    PRESET,
    SAVE_NAME,
    SLIDER_GROUPS,
    as_message,
    group_name,
    group_shown,
    preset_names,
    slider_name,
)

Widgets = dict[str, Any]  # name → Gradio component
GENERATION_PANEL = "generation_panel"  # the "Generation Parameters" accordion

COMPONENTS = {
    "dropdown": gr.Dropdown, "radio": gr.Radio, "slider": gr.Slider, "number": gr.Number,
    "textbox": gr.Textbox, "checkbox": gr.Checkbox, "checkboxgroup": gr.CheckboxGroup,
}
GENERATION_BY_NAME = {f.name: f for f in GENERATION_FIELDS}
BUTTONS = (("merge", "Merge", "primary"), ("merge_and_gen", "Merge and Gen", "primary"), ("gen", "Gen", "secondary"),
           ("stop", "Stop", "stop"), ("restore", "Restore original", "secondary"))
BLOCK_SLIDER = {"minimum": -1.0, "maximum": 2.0, "step": 0.001, "value": 0.5}  # as the alpha slider
# The transformer blocks' groups (Flux's 19 double and 38 single blocks, SD3's 24 joint blocks and the
# 14 more of SD3.5 Large), each in a few columns rather than one long one.
TRANSFORMER_HEADINGS = {"flux_double": "Flux double blocks (D00–D18)", "flux_single": "Flux single blocks (S00–S37)",
                        "sd3_joint": "SD3 joint blocks (J00–J23)", "sd3_large_joint": "SD3.5 Large joint blocks (J24–J37)",
                        "any": "Blocks of model A's layout (Qwen-Image, Wan, HiDream…, a layout file or read from its keys)"}
GROUP_BLOCKS = dict(SLIDER_GROUPS)
SLIDER_COLUMNS = 4
SLIDER_MIN_WIDTH = 120  # Gradio's default column width (320) would wrap four columns in the tab's left part


def component(name: str, **overrides) -> Any:
    """The Gradio component of a declared field, with its label and options (``overrides`` win)."""
    f = FIELDS_BY_NAME.get(name) or GENERATION_BY_NAME[name]
    return COMPONENTS[f.widget.kind](label=f.label, **{**f.widget.options, **overrides})


def add(w: Widgets, *names: str, **overrides) -> None:
    """Make the components of ``names`` into ``w``."""
    for name in names:
        w[name] = component(name, **overrides)


def models_section(w: Widgets, titles: list[str]) -> None:
    """Model A, B and C from the host's checkpoint list, and a refresh button."""
    with gr.Row():
        add(w, "model_a", "model_b", choices=titles)
        add(w, "model_c", choices=titles, interactive=False)
        w["refresh_models"] = gr.Button("Refresh", size="sm", scale=0, min_width=80)
    # Chaining by hand: the current merge becomes model A as a saved recipe (handlers.use_merge_as_model_a).
    with gr.Row():
        w["use_merge_as_a"] = gr.Button("Use the current merge as model A", size="sm")
        # A virtual checkpoint picked as model A, merged into the loaded model (handlers.load_model_a).
        w["load_model_a"] = gr.Button("Load model A (a saved recipe) into the model", size="sm")
    w[ARCH_INFO] = gr.Markdown("")


def mode_section(w: Widgets) -> None:
    """Merge mode, calculation mode (only the pairs that exist) and the ratios."""
    add(w, "mode", "calcmode")
    default = method_for("weight_sum", "normal")
    w[METHOD_INFO] = gr.Markdown(as_message(f"{default.label}: {default.formula}"))
    with gr.Row():
        add(w, "alpha", "beta")
    with gr.Row():
        add(w, "gamma", "seed")


def buttons_section(w: Widgets) -> None:
    """Merge, Merge and Gen, Gen, Stop, Restore original, then the message box."""
    with gr.Row(elem_id="supermerger_buttons"):
        for name, label, variant in BUTTONS:
            w[name] = gr.Button(label, variant=variant, elem_id=f"supermerger_{name}")
    w[MESSAGE] = gr.Markdown("", elem_id="supermerger_message")


def block_weights_section(w: Widgets) -> None:
    """"Merging Block Weights": use MBW, the two weight boxes, presets, Set/Read and the block sliders."""
    with gr.Accordion("Merging Block Weights", open=True):
        add(w, "use_block_weights", "weights_alpha", "weights_beta")
        w[PRESET] = gr.Dropdown(choices=preset_names(), value=None, label="Select preset")
        with gr.Row():
            for side in ("alpha", "beta"):
                w[f"set_{side}"] = gr.Button(f"Set {side}", size="sm")
                w[f"read_{side}"] = gr.Button(f"Read {side}", size="sm")
        block_sliders(w)


def block_sliders(w: Widgets) -> None:
    """One group of sliders per block family; model A's layout shows its groups (handlers.slider_visibility)."""
    with _slider_group(w, "unet"):
        unet_sliders(w, GROUP_BLOCKS["unet"])
    with _slider_group(w, "transformer"):
        gr.Markdown("Flux and SD3: text encoders, input and output layers")
        with gr.Row():
            for block in GROUP_BLOCKS["transformer"]:
                w[slider_name(block)] = gr.Slider(label=block, **BLOCK_SLIDER)
    for group, heading in TRANSFORMER_HEADINGS.items():
        with _slider_group(w, group):
            gr.Markdown(heading)
            slider_columns(w, GROUP_BLOCKS[group])


def _slider_group(w: Widgets, group: str) -> gr.Column:
    """The column of a slider group, shown at first when the starting layout (SD1) has its blocks."""
    w[group_name(group)] = gr.Column(visible=group_shown(GROUP_BLOCKS[group], "sd1"),
                                     elem_id=f"supermerger_sliders_{group}")  # style.css lays them out
    return w[group_name(group)]


def unet_sliders(w: Widgets, blocks: tuple[str, ...]) -> None:
    """IN00–IN11 | BASE, M00 | OUT11–OUT00 side by side, as the original lays them out."""
    columns = {"in": [b for b in blocks if b.startswith("IN")], "mid": ["BASE", "M00"],
               "out": [b for b in blocks if b.startswith("OUT")][::-1]}
    with gr.Row():
        for column, column_blocks in columns.items():
            with gr.Column(elem_id=f"supermerger_sliders_{column}", min_width=SLIDER_MIN_WIDTH):
                for block in column_blocks:
                    w[slider_name(block)] = gr.Slider(label=block, **BLOCK_SLIDER)


def slider_columns(w: Widgets, blocks: tuple[str, ...]) -> None:
    """``blocks`` in SLIDER_COLUMNS columns, read down each column in block order."""
    per_column = -(-len(blocks) // SLIDER_COLUMNS)  # ceiling
    with gr.Row():
        for start in range(0, len(blocks), per_column):
            with gr.Column(min_width=SLIDER_MIN_WIDTH):
                for block in blocks[start:start + per_column]:
                    w[slider_name(block)] = gr.Slider(label=block, **BLOCK_SLIDER)


def key_options_section(w: Widgets) -> None:
    """Elemental Merge, Include/Exclude and Adjust."""
    with gr.Accordion("Elemental Merge", open=False):
        add(w, "elemental", "elemental_extended")
    with gr.Accordion("Include/Exclude", open=False):
        add(w, "include_exclude", "include_exclude_blocks", "include_exclude_elements")
    with gr.Accordion("Adjust", open=False):
        add(w, "adjust")


def dice_section(w: Widgets) -> None:
    """"Let the Dice roll": random block weights."""
    with gr.Accordion("Let the Dice roll", open=False):
        add(w, "dice.mode")
        with gr.Row():
            add(w, "dice.seed", "dice.round", "dice.alpha", "dice.beta")
        with gr.Row():
            add(w, "dice.upper", "dice.lower")
        with gr.Row():
            add(w, "dice.upper_clamp", "dice.lower_clamp")
        add(w, "dice.custom")


def save_section(w: Widgets) -> None:
    """File name, precision, prune, Reset CLIP ids, overwrite, bake VAE, and Save."""
    with gr.Accordion("Save", open=False):
        w[SAVE_NAME] = gr.Textbox(label="File name (empty: the merge's name)", value="")
        add(w, "dtype")
        with gr.Row():
            add(w, "prune", "reset_clip")
            w[OVERWRITE] = gr.Checkbox(label="overwrite", value=False)
            # Off: a merge holding NaN/Inf is refused, naming the key (it never reaches the loaded model either way).
            w[ALLOW_NON_FINITE] = gr.Checkbox(label="write NaN/Inf", value=False)
        add(w, "bake_vae")
        w["save"] = gr.Button("Save", variant="primary")


def generation_section(w: Widgets, defaults: GenerationParams) -> None:
    """"Generation Parameters": the preview's txt2img settings, starting from the host's."""
    values = ui_from_params(defaults)
    with gr.Accordion("Generation Parameters", open=False, elem_id="supermerger_generation") as w[GENERATION_PANEL]:
        for name in ("gen.prompt", "gen.negative_prompt"):
            w[name] = component(name, value=values[name])
        for row in (("gen.steps", "gen.sampler", "gen.cfg_scale"), ("gen.width", "gen.height"),
                    ("gen.seed", "gen.batch_size")):
            with gr.Row():
                for name in row:
                    w[name] = component(name, value=values[name])


def output_section(w: Widgets) -> None:
    """The preview images and their infotext."""
    w[GALLERY] = gr.Gallery(label="Images", columns=2, object_fit="contain")
    w[INFOTEXT] = gr.Textbox(label="Infotext", lines=3, interactive=False)


def history_section(w: Widgets, rows: list[list[Any]]) -> None:
    """The History sub-tab: search, the table, and "Load settings from ID"."""
    with gr.Row():
        w[HISTORY_SEARCH] = gr.Textbox(label="Search (words separated by spaces)", value="")
        w[HISTORY_MATCH] = gr.Radio(label="match", choices=["and", "or"], value="and")
        w["history_reload"] = gr.Button("Reload", size="sm")
    w[HISTORY] = gr.Dataframe(value=rows, headers=list(HISTORY_HEADERS), interactive=False, wrap=True,
                              datatype=["number", "str", "str", "str", "str"])
    with gr.Row():
        w[HISTORY_ID] = gr.Number(label="Load settings from ID (-1: the last)", value=-1, precision=0)
        w["history_load"] = gr.Button("Load settings")
        w["history_show"] = gr.Button("Show recipe")
    w[HISTORY_RECIPE] = gr.Textbox(label="Recipe (JSON)", value="", lines=2, interactive=False)
