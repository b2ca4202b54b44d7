"""The License panel: what a merge of the chosen models may be used for, shown before merging.

Each input's terms and where they came from, the merge's terms, and a warning line when sharing or
selling is not allowed (mergers.licenses). It updates when a model, the mode or the calculation mode
changes. The Merge tab also lets the user set an input's terms by hand (saved as ``MODEL.license.json``
beside it, used from then on); the XYZ and Auto-merge tabs show the panel for their base merge.

Example:
    >>> LicenseActions(session).show({"model_a": "a.safetensors", "model_b": "b.safetensors"})["license_info"]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from mergers.chain import is_virtual_checkpoint
from mergers.checkpoint import open_checkpoint
from mergers.errors import MergeError
from mergers.licenses import (
    COMMERCIAL_USES,
    Terms,
    license_lines,
    read_input_terms,
    terms_of_models,
    write_user_terms,
)
from mergers.licenses.combine import MergeTerms
from mergers.methods.modes import method_for
from mergers.session import MergeSession
from mergers.ui.handlers import MESSAGE, as_message

log = logging.getLogger(__name__)

LICENSE_INFO = "license_info"
PANEL_INPUTS = ("model_a", "model_b", "model_c", "mode", "calcmode")
ROLES = {"Model A": "model_a", "Model B": "model_b", "Model C": "model_c"}
# The hand-set terms' choices → values (commercial uses are cumulative, as the site's older form).
CREDIT = {"unknown": None, "required": True, "not required": False}
YES_NO = {"unknown": None, "yes": True, "no": False}
COMMERCIAL = {"unknown": None, "none": (), "sell images": COMMERCIAL_USES[:1],
              "images, Civitai's generator": COMMERCIAL_USES[:2],
              "images, generators, renting the model": COMMERCIAL_USES[:3],
              "all, selling the model too": COMMERCIAL_USES}
HAND_FIELDS = ("license.model", "license.name", "license.author", "license.credit", "license.commercial",
               "license.derivatives", "license.different_license")
SAVE = "license.save"
NO_MODELS = "Choose the models to see what their merge may be used for."


def chosen_models(values: Mapping[str, Any]) -> list[str]:
    """The models the merge would read: as many of A, B, C as the method takes, those chosen.

    Example:
        >>> chosen_models({"model_a": "a", "model_b": "b", "model_c": "c", "mode": "Weight sum"})
        ['a', 'b']
    """
    try:
        count = method_for(values.get("mode") or "Weight sum", values.get("calcmode") or "normal").models
    except MergeError:  # a calc mode the mode lacks (the tab is about to change it): every slot
        count = 3
    return [values[role] for role in ("model_a", "model_b", "model_c")[:count] if values.get(role)]


def panel_markdown(merged: MergeTerms) -> str:
    """The report as Markdown: one line each, warnings marked."""
    lines = [f"⚠ **{as_message(line)}**" if line.startswith("warning:") else as_message(line)
             for line in license_lines(merged)]
    return "  \n".join(lines)


class LicenseActions:
    """The panel's handlers around a session (values by name → outputs by name)."""

    def __init__(self, session: MergeSession):
        self.session = session

    def show(self, values: Mapping[str, Any]) -> dict:
        """The panel for the chosen models; a model that cannot be read is said in the panel."""
        names = chosen_models(values)
        if not names:
            return {LICENSE_INFO: NO_MODELS}
        try:
            return {LICENSE_INFO: panel_markdown(terms_of_models(names, self.session.host.resolve))}
        except MergeError as error:
            return {LICENSE_INFO: as_message(f"license not known: {error}")}
        except Exception as error:  # a bug: keep the tab alive, the traceback goes to the log
            log.exception("the license panel failed")
            return {LICENSE_INFO: as_message(f"license not known (unexpected {type(error).__name__}: {error})")}

    def save_terms(self, values: Mapping[str, Any]) -> dict:
        """Save the hand-set terms of the chosen input as MODEL.license.json, then show the panel again."""
        try:
            path = write_user_terms(self._model_path(values), hand_terms(values))
        except MergeError as error:
            return {MESSAGE: as_message(str(error))}
        return {**self.show(values), MESSAGE: as_message(f"saved the terms in {path.name}; used from now on")}

    def fill_form(self, values: Mapping[str, Any]) -> dict:
        """The form shows the chosen input's terms as known now (what Save starts from)."""
        try:
            with open_checkpoint(self._model_path(values)) as ckpt:
                return form_values(read_input_terms(ckpt).terms)
        except MergeError as error:
            return {MESSAGE: as_message(str(error))}

    def _model_path(self, values: Mapping[str, Any]) -> Path:
        label = values.get("license.model") or "Model A"
        name = values.get(ROLES.get(label, "model_a"))
        if not name:
            raise MergeError(f"choose {label} first, then set its terms")
        path = self.session.host.resolve(name)
        if is_virtual_checkpoint(path):
            raise MergeError(f"{path.name} is a saved recipe: set the terms of the models it merges")
        return path


def hand_terms(values: Mapping[str, Any]) -> Terms:
    """The terms the user set in the panel's form ("unknown" leaves a field to what the files say).

    Example:
        >>> hand_terms({"license.derivatives": "no", "license.commercial": "none"}).commercial
        ()
    """
    return Terms(license=(values.get("license.name") or "").strip() or None,
                 author=(values.get("license.author") or "").strip() or None,
                 credit_required=CREDIT[values.get("license.credit") or "unknown"],
                 commercial=COMMERCIAL[values.get("license.commercial") or "unknown"],
                 derivatives=YES_NO[values.get("license.derivatives") or "unknown"],
                 different_license=YES_NO[values.get("license.different_license") or "unknown"])


def form_values(terms: Terms) -> dict[str, Any]:
    """The form's values showing ``terms`` (a commercial list the choices cannot say shows "unknown": as found).

    Example:
        >>> form_values(Terms(derivatives=False))["license.derivatives"]
        'no'
    """
    def choice(table: Mapping[str, Any], value: Any) -> str:
        return next((label for label, known in table.items() if known == value), "unknown")
    return {"license.name": terms.license or "", "license.author": terms.author or "",
            "license.credit": choice(CREDIT, terms.credit_required),
            "license.commercial": choice(COMMERCIAL, terms.commercial),
            "license.derivatives": choice(YES_NO, terms.derivatives),
            "license.different_license": choice(YES_NO, terms.different_license)}


# --- layout and wiring ---------------------------------------------------------------------------


def license_section(w: dict, *, editable: bool = True, elem_id: str | None = None) -> None:
    """The License panel (and, in the Merge tab, the form to set an input's terms by hand)."""
    with gr.Accordion("License", open=True):
        w[LICENSE_INFO] = gr.Markdown(NO_MODELS, elem_id=elem_id)
        if editable:
            _hand_form(w)


def _hand_form(w: dict) -> None:
    with gr.Accordion("Set an input's terms by hand (saved as MODEL.license.json beside it)", open=False):
        w["license.model"] = gr.Radio(choices=list(ROLES), value="Model A", label="Input")
        with gr.Row():
            w["license.name"] = gr.Textbox(label="License (empty: as found)", value="")
            w["license.author"] = gr.Textbox(label="Author to credit", value="")
        with gr.Row():
            w["license.credit"] = gr.Dropdown(choices=list(CREDIT), value="unknown", label="Credit")
            w["license.commercial"] = gr.Dropdown(choices=list(COMMERCIAL), value="unknown", label="Commercial use")
        with gr.Row():
            w["license.derivatives"] = gr.Dropdown(choices=list(YES_NO), value="unknown", label="Derivatives allowed")
            w["license.different_license"] = gr.Dropdown(choices=list(YES_NO), value="unknown",
                                                         label="Merges under another license")
        w[SAVE] = gr.Button("Save these terms", size="sm")


def bind_license_panel(w: dict, session: MergeSession) -> None:
    """Update the panel when a model, the mode or the calculation mode changes; Save sets terms by hand."""
    from mergers.ui.tab import bind  # the tab module lays this panel out, so it is imported when needed

    actions = LicenseActions(session)
    for name in PANEL_INPUTS:
        bind(w[name].change, actions.show, w, PANEL_INPUTS, (LICENSE_INFO,))
    if SAVE in w:
        outputs = (LICENSE_INFO, MESSAGE) if MESSAGE in w else (LICENSE_INFO,)
        bind(w[SAVE].click, actions.save_terms, w, (*PANEL_INPUTS, *HAND_FIELDS), outputs)
        bind(w["license.model"].change, actions.fill_form, w, (*PANEL_INPUTS, "license.model"),
             (*HAND_FIELDS[1:], *outputs[1:]))
