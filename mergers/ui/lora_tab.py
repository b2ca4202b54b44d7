"""The LoRA tab: LoRAs into the loaded model or a checkpoint file, LoRAs merged together, a LoRA extracted.

``lora_tab(session)`` lays the widgets out in an open ``gr.Tab`` and binds them to :class:`LoraActions`,
whose handlers are plain functions of values by name → outputs by name (tested without Gradio). LoRAs
are named as ``name:ratio[:blocks]`` entries and looked up in the LoRA folder (the host's ``lora_dir``
when it has one, else ``models/Lora`` beside the checkpoints folder, else the checkpoints folder).

Example:
    >>> with gr.Blocks():
    ...     tab_contents(session, feature_tabs=(("LoRA", "mergers.ui.lora_tab:lora_tab"),))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from mergers.checkpoint import open_checkpoint
from mergers.engine import ProgressCallback
from mergers.errors import CheckpointError, MergeError
from mergers.lora.apply import lora_layer, loras_to_checkpoint
from mergers.lora.blocks import lbw_presets, parse_entries
from mergers.lora.extract import DEFAULT_RANK, extract_lora
from mergers.lora.merge import merge_loras
from mergers.session import MergeSession
from mergers.stack import Layer
from mergers.ui.handlers import MESSAGE, as_message, shows_errors
from mergers.ui.sections import Widgets
from mergers.ui.tab import bind

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
DTYPES = ("as input", "fp16", "bf16", "fp32")
LBW_PRESET_NAMES = ("NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5")
FOLDER, ENTRIES, PICK = "lora.folder", "lora.entries", "lora.pick"
CHECKPOINT, CKPT_NAME, CKPT_DTYPE = "lora.checkpoint", "lora.checkpoint_name", "lora.checkpoint_dtype"
MERGE_NAME, MERGE_RANK, MERGE_DTYPE = "lora.merge_name", "lora.merge_rank", "lora.merge_dtype"
TUNED, BASE, EX_ALPHA, EX_BETA = "lora.tuned", "lora.base", "lora.extract_alpha", "lora.extract_beta"
EX_RANK, EX_CONV_RANK, EX_NAME, EX_DTYPE = "lora.rank", "lora.conv_rank", "lora.extract_name", "lora.extract_dtype"
OVERWRITE = "lora.overwrite"


def default_lora_folder(host) -> Path:
    """The host's ``lora_dir``, else ``models/Lora`` beside the checkpoints (A1111's layout), else the checkpoints."""
    folder = getattr(host, "lora_dir", None)
    if folder:
        return Path(folder)
    beside = Path(host.models_dir).parent / "Lora"
    return beside if beside.is_dir() else Path(host.models_dir)


def lora_files(folder: Path) -> list[str]:
    """LoRA file names in ``folder`` and below, relative to it, sorted."""
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file())


def resolver(folder: Path):
    """A name → file lookup in ``folder``: a path, a file name (with or without suffix), or a stem below it."""
    def resolve(name: str) -> Path:
        for candidate in (Path(name).expanduser(), folder / name, *(folder / f"{name}{s}" for s in LORA_SUFFIXES)):
            if candidate.is_file():
                return candidate
        for found in folder.rglob("*"):
            if found.stem == name and found.suffix in LORA_SUFFIXES:
                return found
        raise CheckpointError(f"LoRA {name!r} is not in {folder}")
    return resolve


class LoraActions:
    """The LoRA tab's handlers around one :class:`MergeSession`."""

    def __init__(self, session: MergeSession):
        self.session = session
        self.host = session.host

    def folder(self, values: Mapping[str, Any]) -> Path:
        text = str(values.get(FOLDER) or "").strip()
        return Path(text).expanduser() if text else default_lora_folder(self.host)

    @shows_errors
    def refresh(self, values: Mapping[str, Any]) -> dict:
        """Re-list the LoRA folder and the checkpoints."""
        names = lora_files(self.folder(values))
        titles = [entry.title for entry in self.host.list_models()]
        return {PICK: gr.update(choices=names), **{k: gr.update(choices=titles) for k in (CHECKPOINT, TUNED, BASE)},
                MESSAGE: as_message(f"{len(names)} LoRA files in {self.folder(values)}")}

    @shows_errors
    def add_picked(self, values: Mapping[str, Any]) -> dict:
        """Append the picked LoRA files to the entries box as ``name:1``."""
        present = str(values.get(ENTRIES) or "").strip()
        added = [f"{name}:1" for name in values.get(PICK) or [] if name not in present]
        text = "\n".join(filter(None, [present, *added]))
        return {ENTRIES: text, PICK: gr.update(value=[])}

    @shows_errors
    def apply_to_loaded(self, values: Mapping[str, Any], *, on_progress: Optional[ProgressCallback] = None) -> dict:
        """Add the LoRAs on top of what the loaded model holds (the merge swapped in, else the checkpoint);
        LoRAs applied here before are replaced. Restore takes it all back to the checkpoint file."""
        entries = parse_entries(str(values.get(ENTRIES) or ""))
        live = self.host.live_model()
        if live is None:
            raise MergeError("no model is loaded: use Save as checkpoint")
        outcome = self.session.apply_layer(self._layer(live, entries, self.folder(values)), on_progress=on_progress)
        replaced = f" (in place of {', '.join(old.label for old in outcome.replaced)})" if outcome.replaced else ""
        return {MESSAGE: as_message(f"{outcome.changed} keys of the loaded model changed by {outcome.layer.label}"
                                    f"{replaced}; it now holds {outcome.stack}; Restore takes it all back to the "
                                    "checkpoint file")}

    def _layer(self, live, entries, folder: Path) -> Layer:
        """The LoRAs as a layer, checked against the loaded checkpoint's keys (its file's, else the live ones)."""
        if live.source is not None:
            with open_checkpoint(live.source) as base:
                shapes, metadata, name = base.shapes, base.metadata, base.name
        else:
            shapes = {key: tuple(t.shape) for key, t in live.tensors().items()}
            metadata, name = None, "the loaded model"
        return lora_layer(entries, shapes, resolve=resolver(folder), metadata=metadata, source=name)

    @shows_errors
    def restore(self, values: Mapping[str, Any]) -> dict:
        """Put the loaded model's own weights back (the merge and the LoRAs on it)."""
        return {MESSAGE: f"{self.session.restore()} keys restored: the loaded model is its checkpoint file again"}

    @shows_errors
    def save_checkpoint(self, values: Mapping[str, Any], *, on_progress: Optional[ProgressCallback] = None) -> dict:
        """Write the chosen checkpoint plus the LoRAs to the checkpoints folder."""
        entries = parse_entries(str(values.get(ENTRIES) or ""))
        source = self.host.resolve(_required(values, CHECKPOINT, "a checkpoint"))
        name = str(values.get(CKPT_NAME) or "").strip() or f"{source.stem}+lora"
        result = loras_to_checkpoint(source, entries, self.session.output_path(name),
                                     resolve=resolver(self.folder(values)), dtype=_dtype(values, CKPT_DTYPE),
                                     overwrite=bool(values.get(OVERWRITE)), on_progress=on_progress)
        return {MESSAGE: as_message(f"{result.architecture}: {result.changed} keys changed; wrote {result.path} "
                                    f"in {result.seconds:.1f} s")}

    @shows_errors
    def merge(self, values: Mapping[str, Any], *, on_progress: Optional[ProgressCallback] = None) -> dict:
        """Merge the LoRAs into one LoRA file in the LoRA folder."""
        entries = parse_entries(str(values.get(ENTRIES) or ""))
        folder = self.folder(values)
        rank = str(values.get(MERGE_RANK) or "").strip() or None
        name = str(values.get(MERGE_NAME) or "").strip() or "+".join(Path(e.name).stem for e in entries)
        result = merge_loras(entries, self._lora_output(folder, name), rank=rank, resolve=resolver(folder),
                             dtype=_dtype(values, MERGE_DTYPE), overwrite=bool(values.get(OVERWRITE)),
                             on_progress=on_progress)
        return {MESSAGE: as_message(f"wrote {result.summary}")}

    @shows_errors
    def extract(self, values: Mapping[str, Any], *, on_progress: Optional[ProgressCallback] = None) -> dict:
        """Extract alpha·tuned − beta·base into a LoRA file in the LoRA folder."""
        tuned = self.host.resolve(_required(values, TUNED, "the tuned model"))
        base = self.host.resolve(_required(values, BASE, "the base model"))
        conv_rank = int(values.get(EX_CONV_RANK) or 0) or None
        name = str(values.get(EX_NAME) or "").strip() or f"lora_{tuned.stem}-{base.stem}"
        result = extract_lora(tuned, base, self._lora_output(self.folder(values), name),
                              rank=int(values.get(EX_RANK) or DEFAULT_RANK), conv_rank=conv_rank,
                              alpha=float(values.get(EX_ALPHA, 1.0)), beta=float(values.get(EX_BETA, 1.0)),
                              dtype=_dtype(values, EX_DTYPE) or "fp16", overwrite=bool(values.get(OVERWRITE)),
                              on_progress=on_progress)
        return {MESSAGE: as_message(f"wrote {result.summary}")}

    def _lora_output(self, folder: Path, name: str) -> Path:
        """``folder/name.safetensors``; the name must be a plain file name (as checkpoints' are)."""
        return folder / self.session.output_path(name).name


def _required(values: Mapping[str, Any], name: str, what: str) -> str:
    value = values.get(name)
    if not value:
        raise MergeError(f"choose {what} first")
    return str(value)


def _dtype(values: Mapping[str, Any], name: str) -> Optional[str]:
    value = values.get(name)
    return None if value in (None, "", DTYPES[0]) else str(value)


# --- layout ----------------------------------------------------------------------------


def lora_tab(session: MergeSession) -> None:
    """Lay the LoRA tab out in the open ``gr.Tab`` and bind its events."""
    actions = LoraActions(session)
    titles = [entry.title for entry in session.host.list_models()]
    folder = default_lora_folder(session.host)
    w: Widgets = {}
    w[MESSAGE] = gr.Markdown("")
    with gr.Row():
        with gr.Column(scale=3):
            _loras_section(w, folder)
        with gr.Column(scale=2):
            _checkpoint_section(w, titles)
            _merge_section(w)
            _extract_section(w, titles)
    _bind(w, actions)


def _loras_section(w: Widgets, folder: Path) -> None:
    w[FOLDER] = gr.Textbox(label="LoRA folder", value=str(folder))
    with gr.Row():
        w[PICK] = gr.Dropdown(label="LoRA files", choices=lora_files(folder), multiselect=True)
        w["lora.add"] = gr.Button("Add")
        w["lora.refresh"] = gr.Button("Refresh")
    w[ENTRIES] = gr.Textbox(label="LoRAs (name:ratio[:blocks], one a line)", lines=4,
                            placeholder="style.safetensors:0.8:OUTALL")
    presets = lbw_presets()
    shown = "\n".join(f"{name}: {presets[name]}" for name in LBW_PRESET_NAMES if name in presets)
    gr.Textbox(label="Block presets (17 values: BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03-OUT11; "
                     "the Merge tab's presets work too)", value=shown, lines=5, interactive=False)
    w[OVERWRITE] = gr.Checkbox(label="Overwrite existing files", value=False)


def _checkpoint_section(w: Widgets, titles: list[str]) -> None:
    with gr.Accordion("Into a checkpoint", open=True):
        with gr.Row():
            w["lora.apply"] = gr.Button("Apply to loaded model", variant="primary")
            w["lora.restore"] = gr.Button("Restore")
        w[CHECKPOINT] = gr.Dropdown(label="Checkpoint to save with the LoRAs", choices=titles)
        w[CKPT_NAME] = gr.Textbox(label="File name (checkpoints folder)")
        w[CKPT_DTYPE] = gr.Radio(label="Precision", choices=list(DTYPES), value=DTYPES[0])
        w["lora.save_checkpoint"] = gr.Button("Save as checkpoint")


def _merge_section(w: Widgets) -> None:
    with gr.Accordion("Merge LoRAs into one", open=False):
        w[MERGE_RANK] = gr.Textbox(label="Rank: empty = exact (ranks add up), a number, or auto (largest input)")
        w[MERGE_NAME] = gr.Textbox(label="File name (LoRA folder)")
        w[MERGE_DTYPE] = gr.Radio(label="Precision", choices=list(DTYPES), value=DTYPES[0])
        w["lora.merge"] = gr.Button("Merge LoRAs")


def _extract_section(w: Widgets, titles: list[str]) -> None:
    with gr.Accordion("Extract a LoRA (alpha·tuned − beta·base)", open=False):
        with gr.Row():
            w[TUNED] = gr.Dropdown(label="Tuned model", choices=titles)
            w[BASE] = gr.Dropdown(label="Base model", choices=titles)
        with gr.Row():
            w[EX_ALPHA] = gr.Number(label="alpha", value=1.0)
            w[EX_BETA] = gr.Number(label="beta", value=1.0)
        with gr.Row():
            w[EX_RANK] = gr.Number(label="Rank", value=DEFAULT_RANK, precision=0)
            w[EX_CONV_RANK] = gr.Number(label="Conv 3x3 rank (0: no convs)", value=0, precision=0)
        w[EX_NAME] = gr.Textbox(label="File name (LoRA folder)")
        w[EX_DTYPE] = gr.Radio(label="Precision", choices=list(DTYPES[1:]), value="fp16")
        w["lora.extract"] = gr.Button("Extract LoRA")


def _bind(w: Widgets, actions: LoraActions) -> None:
    loras = (FOLDER, ENTRIES, OVERWRITE)
    bind(w["lora.refresh"].click, actions.refresh, w, (FOLDER,), (PICK, CHECKPOINT, TUNED, BASE, MESSAGE))
    bind(w["lora.add"].click, actions.add_picked, w, (PICK, ENTRIES), (ENTRIES, PICK, MESSAGE))
    bind(w["lora.apply"].click, actions.apply_to_loaded, w, loras, (MESSAGE,), progress=True)
    bind(w["lora.restore"].click, actions.restore, w, (), (MESSAGE,))
    bind(w["lora.save_checkpoint"].click, actions.save_checkpoint, w, (*loras, CHECKPOINT, CKPT_NAME, CKPT_DTYPE),
         (MESSAGE,), progress=True)
    bind(w["lora.merge"].click, actions.merge, w, (*loras, MERGE_RANK, MERGE_NAME, MERGE_DTYPE), (MESSAGE,),
         progress=True)
    bind(w["lora.extract"].click, actions.extract, w,
         (FOLDER, OVERWRITE, TUNED, BASE, EX_ALPHA, EX_BETA, EX_RANK, EX_CONV_RANK, EX_NAME, EX_DTYPE), (MESSAGE,),
         progress=True)
