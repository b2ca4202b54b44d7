"""One user's merging session inside a host: merge, swap in, generate, save, restore.

The tab and the HTTP API drive this object; it holds no UI code. One merge runs
at a time: a second request while one runs is refused (``MergeBusy``), never
interleaved.

Example:
    >>> session = MergeSession(host)
    >>> outcome = session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
    >>> session.merge(outcome.recipe.with_changes(weights_alpha="GRAD_V"), only_changed=True).rewritten
    1130
    >>> session.restore()
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergers.chain import load_recipe_file
from mergers.checkpoint import open_checkpoint
from mergers.engine import CancelToken, ProgressCallback, run_plan
from mergers.errors import MergeError, NonFiniteError, OutputError
from mergers.history import History, HistoryEntry, merge_name
from mergers.host import Generated, GenerationParams, Host
from mergers.merge import merge_to_file, open_sources
from mergers.models import VIRTUAL_SUFFIX
from mergers.plan import KeyStep, MergePlan, Sources, missing_message, plan_merge
from mergers.recipe import Recipe
from mergers.stack import Layer, LayerOutcome, layer_infotext, replace_layer, stack_name, stacked
from mergers.swap import Swapper

# A saved file's name: letters, digits and a few marks; no folders, no "..".
SAFE_NAME = re.compile(r"^[\w][\w .,()+=\-\[\]]*$")
# A merge's name as a default file name, as the original makes it: spaces dropped, ",()" → "_".
UNSAFE_FILE_CHARS = re.compile(r"[^\w.+=\-\[\]]")
# Windows refuses paths over 260 characters (MAX_PATH) unless long paths are enabled, which by default
# they are not: a models folder of ~100 characters, the stem, ".safetensors" and the writer's temp suffix fit.
MAX_FILE_STEM = 120 if os.name == "nt" else 200
NOT_SWAPPED = "The merge was stopped and the loaded model's weights were put back: none of it is in the model"
LAYER_NOT_SWAPPED = ("nothing of it was kept: the loaded model is back to its checkpoint's own weights (what was "
                     "swapped in under it too)")
RESTORE_HINT = ("press Restore (the tab's \"Restore original\", the indicator's Restore, or POST "
                "/supermerger/v1/restore) to put the checkpoint's own weights back")
ALLOW_HINT = ("to write it to a file anyway, tick \"write NaN/Inf\" (tab), pass --allow-non-finite (command line) or "
              "\"allow_non_finite\": true (API)")


def file_stem(name: str) -> str:
    """``name`` as a file name stem that ``output_path`` accepts (the original's rule, made safe).

    Example:
        >>> file_stem("a x 0.5 + b x 0.5")
        'ax0.5+bx0.5'
    """
    stem = UNSAFE_FILE_CHARS.sub("_", name.replace(" ", ""))[:MAX_FILE_STEM]
    # No ".." with the extension after a cut, and a word character first, as SAFE_NAME wants.
    return stem.rstrip(".").lstrip(".+=-[]") or "merge"
# A partial re-merge (only_changed) needs everything but the per-key ratios to be the same.
SAME_FOR_PARTIAL = ("model_a", "model_b", "model_c", "more_models", "mode", "calcmode", "gamma", "seed", "dtype",
                    "prune", "reset_clip", "bake_vae")


class MergeBusy(MergeError):
    """Another merge is running in this session."""


@dataclass(frozen=True)
class MergeOutcome:
    """What a merge did, for the UI's message and the API's answer."""

    name: str
    recipe: Recipe | None  # as run: dice drawn, seeds fixed; None for apply_stream
    history_id: int | None
    merged_keys: int
    swapped: bool  # written into the loaded model (False: no model loaded; use Save)
    seconds: float
    architecture: str
    info: Mapping[str, Any] = field(default_factory=dict)  # what a non-recipe change (apply_stream) was
    rewritten: int | None = None  # a partial re-merge (only_changed): the keys it merged and swapped
    warnings: tuple[str, ...] = ()  # what the user should know (e.g. NaN keys a save was allowed to write)
    refused: bool = False  # the swap met NaN/Inf and was undone (allow_non_finite kept it for Save)
    not_swapped_why: str = ""  # the host's reason when a loaded model cannot take merges (e.g. Forge NF4)

    @property
    def summary(self) -> str:
        where = "swapped into the loaded model" if self.swapped else "planned (no model loaded: Save writes it)"
        if not self.swapped and self.not_swapped_why:
            where = f"not swapped in: {self.not_swapped_why}"
        if self.refused:
            where = "NOT swapped in (it holds NaN/Inf; the loaded model keeps its weights; Save may write it)"
        if self.rewritten is not None:
            where = f"{self.rewritten} changed keys re-merged and swapped"
        number = f" (ID {self.history_id})" if self.history_id is not None else ""
        return f"{self.name}{number}: {self.merged_keys} keys merged, {where}, {self.seconds:.1f} s" + \
            warnings_text(self.warnings)


# A long list of NaN keys would bury the message: the first few, then how many more.
WARNINGS_SHOWN = 5


def warnings_text(warnings: Iterable[str]) -> str:
    """Warnings as lines to append to a message ("" when there are none).

    Example:
        >>> warnings_text(["'k': merged result is not finite (NaN; ...)"])
        "\\nwarning: 'k': merged result is not finite (NaN; ...)"
    """
    warnings = list(warnings)
    lines = [f"\nwarning: {text}" for text in warnings[:WARNINGS_SHOWN]]
    if len(warnings) > WARNINGS_SHOWN:
        lines.append(f"\n… and {len(warnings) - WARNINGS_SHOWN} more warnings (see the history or the log)")
    return "".join(lines)


class MergeSession:
    """Merges recipes into a host's loaded model and keeps their history."""

    def __init__(self, host: Host, *, history: History | None = None):
        self.host = host
        self.history = history or History(host.data_dir)
        self.current: MergeOutcome | None = None
        self._swapper: Swapper | None = None
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._owner: int | None = None  # the thread holding the session (exclusive()), or None
        self._halt = threading.Event()  # Stop pressed while the session is held: the holder ends its run
        self.save_warnings: tuple[str, ...] = ()  # the last save's NaN/Inf keys it was allowed to write
        self.layers: tuple[Layer, ...] = ()  # on top of the merge (or the checkpoint), bottom first (mergers/stack.py)

    def merge(self, recipe: Recipe, *, on_progress: ProgressCallback | None = None,
              only_changed: bool = False, history_extra: Mapping[str, Any] | None = None,
              allow_non_finite: bool = False, record: bool = True) -> MergeOutcome:
        """Merge ``recipe`` and swap it into the loaded model (restored exactly if anything fails).

        A merged key holding NaN or Inf never stays in the loaded model: the swap stops there and puts
        back what it changed, and ``NonFiniteError`` names the key, the method and its source. With
        ``allow_non_finite`` the merge becomes ``current`` anyway, not swapped in (``refused``, the
        reason in ``warnings``), so ``save(..., allow_non_finite=True)`` can write it.
        ``record``: False leaves the history line to ``record_history`` (a merge saved in the same
        request, whose save's warnings belong on its line).

        ``only_changed``: when the loaded model holds the current merge and ``recipe`` differs
        from it only in ratios (block weights, alpha/beta, elemental, include/exclude, adjust),
        merge and swap only the keys whose planned step changed; the result is the same as a
        full merge. Otherwise (other models, mode, a cosine statistics pass…) it merges in full.
        ``history_extra``: JSON-able facts kept on the merge's history line (``HistoryEntry.extra``),
        e.g. the search run and candidate it belongs to.
        """
        with self._running():
            started = time.perf_counter()
            dropped = self._layers_in_model()
            try:
                with open_sources(recipe, self.host.resolve) as sources:
                    plan = plan_merge(recipe, sources)
                    previous = self._previous_plan(plan, sources) if only_changed else None
                    steps = changed_steps(previous, plan) if previous is not None else None
                    partial = replace(plan, steps=steps) if steps is not None else plan
                    swapped, refusal = self._swap_finite(partial, sources, on_progress,
                                                         keep_unwritten=steps is not None,
                                                         allow_non_finite=allow_non_finite)
            except BaseException:
                if self._swapper is None or not self._swapper.merged:  # the swap put the checkpoint back
                    self.layers = ()
                raise
            self.layers = ()  # a full merge rewrote the layers' keys (or the model is the checkpoint again)
            rewritten = len(steps) if steps is not None and not refusal else None
            notes = (f"{_titles(dropped)} came out of the model with this merge; apply it again to put it on top",
                     ) if dropped and swapped and not refusal else ()
            outcome = self._outcome(plan, swapped, time.perf_counter() - started, rewritten, (*refusal, *notes))
            outcome = replace(outcome, refused=bool(refusal),
                              not_swapped_why="" if swapped else self._no_swap_reason())
            self.current = self._record(outcome, history_extra) if record else outcome
            return self.current

    def record_history(self, *, warnings: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> MergeOutcome:
        """Write the history line of the current merge made with ``record=False``, with ``warnings``
        added (e.g. those of its save); returns the outcome, now with its history ID.

        Example:
            >>> session.merge(recipe, record=False); session.save("ab", allow_non_finite=True)
            >>> session.record_history(warnings=session.save_warnings).history_id
            7
        """
        current = self.current
        if current is None or current.recipe is None or current.history_id is not None:
            raise MergeError("no unrecorded merge to record")
        self.current = self._record(replace(current, warnings=(*current.warnings, *warnings)), extra)
        return self.current

    def load_virtual(self, name: str, *, on_progress: ProgressCallback | None = None) -> MergeOutcome:
        """Merge a virtual checkpoint (a saved ``NAME.recipe.json``) into the loaded model, as if the user
        had picked a real checkpoint: its recipe streams in, key by key, and Restore undoes it.

        Example:
            >>> session.load_virtual("AB_gradv.recipe.json").summary
        """
        path = self.host.resolve(name)
        if not path.name.lower().endswith(VIRTUAL_SUFFIX):
            raise MergeError(f"{name!r} is a checkpoint file, not a saved recipe ({VIRTUAL_SUFFIX}): load it in the "
                             "web UI's checkpoint list, or merge it as model A")
        return self.merge(load_recipe_file(path), on_progress=on_progress)

    def apply_stream(self, name: str, stream: Callable[[CancelToken], Iterable[tuple[str, torch.Tensor]]], *,
                     info: Mapping[str, Any] | None = None) -> int:
        """Swap a stream of tensors made by another feature (e.g. a LoRA applied to the loaded
        checkpoint) into the loaded model, restored exactly if it fails; returns tensors changed.

        ``stream(cancel)`` is called once, under the session's one-at-a-time rule; the result
        becomes ``current`` with no recipe (Save re-streams recipes only, so it is refused).

        Example:
            >>> session.apply_stream("model + lora", lambda cancel: lora_pairs(...), info={"lora": "x:0.5"})
        """
        with self._running():
            started = time.perf_counter()
            self._live_swapper()
            try:
                with self.host.lock():
                    report = self._swapper.apply(stream(self._cancel), cancel=self._cancel, check_finite=True)
            except NonFiniteError as error:
                raise NonFiniteError(f"{name}: {error}. {NOT_SWAPPED}", key=error.key) from error
            self.current = MergeOutcome(name, None, None, report.changed, True, time.perf_counter() - started,
                                        "", dict(info or {}))
            self.layers = ()  # the stream replaced everything (the swap reverted the rest to the file)
            return report.changed

    def _live_swapper(self) -> Swapper:
        """The swapper of the loaded model; a new one when the web UI loaded another model object."""
        live = self.host.live_model()
        if live is None:
            raise MergeError("no model is loaded to apply this to")
        if self._swapper is None or self._swapper.live is not live:
            self._swapper = Swapper(live)
        return self._swapper

    def apply_layer(self, layer: Layer, *, on_progress: ProgressCallback | None = None) -> LayerOutcome:
        """Put ``layer`` (e.g. the LoRA tab's LoRAs) on top of what is swapped in: the merge, else the checkpoint.

        Each key it changes is computed from the bottom up (the merge's recipe streamed again for those keys,
        else the checkpoint file, then every layer), so the model holds what the saved merge with the layer
        baked in would; the merge's other keys stay. A layer of the same kind is replaced (its keys go back).
        On any failure the loaded model is put back to its checkpoint (the merge under it too).

        Example:
            >>> session.merge(recipe); session.apply_layer(lora_layer(entries, ...)).stack
            'a x 0.7 + b x 0.3, then LoRA style:0.8'
        """
        with self._running():
            started = time.perf_counter()
            live = self._live_swapper().live
            merge, below = self._merge_in_model(), self._layers_in_model()
            if self._swapper.merged and merge is None and not below:
                raise MergeError(f"{self.current.name if self.current else 'an unsaved change'} is swapped in and "
                                 f"cannot be streamed again to go under {layer.title}; {RESTORE_HINT} first")
            layers, replaced = replace_layer(below, layer)
            keys = set(layer.keys).union(*(old.keys for old in replaced))
            try:
                with self._values_below(merge, live, keys) as base, stacked(base, layers) as pairs, \
                        self.host.lock():
                    report = self._swapper.apply(_counted(pairs, len(keys), on_progress), cancel=self._cancel,
                                                 keep_unwritten=True, check_finite=True)
            except BaseException as error:
                if not self._swapper.merged:  # the swapper put the checkpoint back: nothing of ours is in
                    self.current, self.layers = None, ()
                if isinstance(error, NonFiniteError):
                    raise NonFiniteError(f"{layer.title}: {error}; {LAYER_NOT_SWAPPED}", key=error.key) from error
                raise
            self.layers = layers
            base = merge.name if merge is not None else _stem(live.source)
            return LayerOutcome(layer, report.changed, time.perf_counter() - started, stack_name(base, layers),
                                replaced)

    def merge_and_generate(self, recipe: Recipe, params: GenerationParams, *,
                           on_progress: ProgressCallback | None = None) -> tuple[MergeOutcome, Generated]:
        """Merge, then generate with the merged model."""
        outcome = self.merge(recipe, on_progress=on_progress)
        return outcome, self.generate(params)

    def generate(self, params: GenerationParams) -> Generated:
        """txt2img with whatever is loaded; the infotext names the current merge and its recipe.

        A failure while a merge is swapped in says so, and how to put the checkpoint's weights back."""
        if not self.host.can_generate():
            raise MergeError("preview needs the web UI: this host has no image generator")
        extra = self.infotext()
        try:
            return self.host.generate(params, extra_info=extra)
        except Exception as error:
            if not extra:
                raise
            number = f" (ID {extra['SuperMerger ID']})" if "SuperMerger ID" in extra else ""
            what = str(error) if isinstance(error, MergeError) else f"{type(error).__name__}: {error}"
            raise MergeError(f"{what} — this happened with the merge {extra['SuperMerger']}{number} swapped into "
                             f"the loaded model; {RESTORE_HINT}") from error

    def state(self) -> dict[str, Any]:
        """What the loaded model holds now, for the web UI's indicator and ``GET /state``: the swapped-in
        merge (name, history ID, recipe, warnings) or none, and the checkpoint it was swapped into.

        Example:
            >>> session.state()["merged"]
            False
        """
        current, swapper = self.current, self._swapper
        live = self.host.live_model()
        source = getattr(live, "source", None)
        state: dict[str, Any] = {"merged": False, "name": None, "history_id": None, "recipe": None,
                                 "warnings": [], "changed_keys": 0, "stack": [],
                                 "checkpoint": Path(source).name if source else None}
        if swapper is None or not swapper.merged or live is None or swapper.live is not live:
            return state
        layers = self._layers_in_model()
        stack = [{"kind": layer.kind, "name": layer.label} for layer in layers]
        if current is not None and current.swapped:
            state.update(name=stack_name(current.name, layers), history_id=current.history_id,
                         warnings=list(current.warnings),
                         recipe=current.recipe.to_dict() if current.recipe is not None else None)
            stack.insert(0, {"kind": "merge", "name": current.name, "history_id": current.history_id})
        elif layers:  # LoRAs on the checkpoint's own weights
            state["name"] = stack_name(_stem(source), layers)
            stack.insert(0, {"kind": "checkpoint", "name": state["checkpoint"]})
        else:  # changed weights with no swapped-in outcome (a failed merge could not put all back): not the checkpoint
            state["name"] = "an unsaved change"
        state.update(merged=True, changed_keys=len(swapper.changed_keys), stack=stack)
        return state

    def infotext(self) -> dict[str, Any]:
        """What an image made now should say of the merge in the loaded model ({} when there is none):
        its name, history ID and recipe. The A1111 glue adds it to txt2img's own images too.

        Example:
            >>> session.infotext()
            {'SuperMerger': 'a x 0.5 + b x 0.5', 'SuperMerger ID': 3, 'SuperMerger recipe': '{...}'}
        """
        current, swapper = self.current, self._swapper
        if swapper is None or not swapper.merged:
            return {}
        live = self.host.live_model()
        if live is not swapper.live:  # the host loaded another checkpoint since
            return {}
        layers = self._layers_in_model()
        merged = current is not None and current.swapped
        if not merged and not layers:
            return {}
        extra: dict[str, Any] = {"SuperMerger": stack_name(current.name if merged else _stem(live.source), layers),
                                 **(current.info if merged else {})}
        if merged and current.history_id is not None:
            extra["SuperMerger ID"] = current.history_id
        if merged and current.recipe is not None:
            extra["SuperMerger recipe"] = current.recipe.to_json()
        extra.update(layer_infotext(layers))
        return extra

    def save(self, filename: str, *, dtype: str | None = None, prune: bool = False, overwrite: bool = False,
             bake_vae: str | None = None, on_progress: ProgressCallback | None = None,
             allow_non_finite: bool = False) -> Path:
        """Write the current merge to ``models_dir/filename`` by streaming its recipe again (exact, any dtype).

        A key holding NaN or Inf refuses the save (``NonFiniteError``, nothing written) unless
        ``allow_non_finite``; the keys it wrote so are in ``save_warnings`` afterwards."""
        if self.current is None:
            raise MergeError("nothing to save: merge first")
        if self.current.recipe is None:
            raise MergeError(f"{self.current.name} has no merge recipe to save from; save it from where it was made")
        target = self.output_path(filename)
        recipe = self.current.recipe.with_changes(dtype=dtype, prune=prune, bake_vae=bake_vae)
        self.save_warnings = ()
        with self._running():
            try:
                result = merge_to_file(recipe, target, resolve=self.host.resolve, overwrite=overwrite,
                                       on_progress=on_progress, cancel=self._cancel, allow_non_finite=allow_non_finite)
            except NonFiniteError as error:
                raise NonFiniteError(f"{error}. Nothing was saved; {ALLOW_HINT}", key=error.key,
                                     method=error.method) from error
        layers = self._layers_in_model()
        on_top = ((f"the file holds the merge only: {_titles(layers)}, swapped in on top of it, is not in it (the "
                   "LoRA tab's \"Save as checkpoint\" bakes LoRAs into a saved file)"),) if layers else ()
        self.save_warnings = (*result.warnings, *on_top)
        return target

    def restore(self) -> int:
        """Put the loaded model's original weights back; returns how many tensors were restored."""
        with self._running():
            if self._swapper is None:
                return 0
            try:
                with self.host.lock():
                    return self._swapper.restore()
            except MergeError:
                self._swapper = None  # e.g. the host loaded another checkpoint since: nothing of ours to undo
                raise
            finally:
                self.current, self.layers = None, ()

    def stop(self) -> None:
        """Cancel the running merge or save (it restores what it changed), and end a run that holds the
        session (an auto-merge search) after its current step, even when no merge is running right now."""
        self._cancel.set()
        if self._owner is not None:
            self._halt.set()

    @property
    def halted(self) -> bool:
        """True when Stop was pressed since the session was last taken with ``exclusive()``."""
        return self._halt.is_set()

    def recipe_from_history(self, merge_id: int) -> HistoryEntry:
        """A past merge by ID (-1 = the last one), to fill the tab or replay."""
        return self.history.get(merge_id)

    def output_path(self, filename: str) -> Path:
        """``models_dir/filename.safetensors``; a name that leaves the folder is refused."""
        name = filename.strip()
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        if not SAFE_NAME.match(name) or ".." in name or len(name) > 240:
            raise OutputError(f"{filename!r} is not a plain file name (letters, digits, spaces, _ - . , ( ) + = [ ])")
        return self.host.models_dir / name

    def _swap(self, plan: MergePlan, sources, on_progress, *, keep_unwritten: bool = False) -> bool:
        live = self.host.live_model()
        if live is None:
            return False
        if self._swapper is None or self._swapper.live is not live:
            self._swapper = Swapper(live)
        # A result computed straight into a live tensor (CUDA too) is yielded as it is; others come to the
        # CPU and copy_ converts them to each live tensor's dtype and device.
        stream = run_plan(plan, sources, on_progress=on_progress, cancel=self._cancel,
                          output_device="cpu", out_for=self._swapper.target_for, mapped=True)
        with self.host.lock():
            self._swapper.apply(stream, cancel=self._cancel, keep_unwritten=keep_unwritten)
        return True

    def _swap_finite(self, plan: MergePlan, sources, on_progress, *, keep_unwritten: bool,
                     allow_non_finite: bool) -> tuple[bool, tuple[str, ...]]:
        """``_swap``, and on a NaN/Inf key (put back already): raise saying so, or with ``allow_non_finite``
        return (False, the refusal as a warning) so the merge can still be saved."""
        try:
            return self._swap(plan, sources, on_progress, keep_unwritten=keep_unwritten), ()
        except NonFiniteError as error:
            if not allow_non_finite:
                raise NonFiniteError(f"{error}. {NOT_SWAPPED}; {ALLOW_HINT}", key=error.key,
                                     method=error.method) from error
            return False, (f"{error}. {NOT_SWAPPED}",)

    def _previous_plan(self, plan: MergePlan, sources: Sources) -> MergePlan | None:
        """The current merge's plan when ``plan`` can be swapped in as a partial update of it, else None."""
        current, swapper = self.current, self._swapper
        if current is None or not current.swapped or current.recipe is None or swapper is None:
            return None
        if not swapper.merged or swapper.live is not self.host.live_model():
            return None  # a failed merge or a restore put the original back; another model was loaded
        if self._layers_in_model():
            return None  # layers on top (a LoRA): a full merge rewrites their keys too
        if plan.method.prepass is not None or not same_but_ratios(current.recipe, plan.recipe):
            return None  # a statistics pass (cosineA/B) depends on every key: merge in full
        previous = plan_merge(current.recipe, sources)
        if [step.key for step in previous.steps] != [step.key for step in plan.steps]:
            return None
        return previous

    def _merge_in_model(self) -> MergeOutcome | None:
        """The current merge when it is what the loaded model holds under any layers (streamable again), else None."""
        current, swapper = self.current, self._swapper
        if current is None or not current.swapped or current.recipe is None or swapper is None:
            return None
        return current if swapper.merged and swapper.live is self.host.live_model() else None

    def _layers_in_model(self) -> tuple[Layer, ...]:
        """The layers on top, while they are in the loaded model (none after a restore or another load)."""
        swapper = self._swapper
        if not self.layers or swapper is None or not swapper.merged or swapper.live is not self.host.live_model():
            return ()
        return self.layers

    @contextlib.contextmanager
    def _values_below(self, merge: MergeOutcome | None, live, keys: set[str]
                      ) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
        """``(key, value)`` for ``keys`` below every layer: the merge's (its recipe streamed again for just
        those keys, full precision), else the checkpoint file's, else (keys in neither) the live tensor's."""
        with contextlib.ExitStack() as opened:
            parts, rest = [], set(keys)
            if merge is not None:
                sources = opened.enter_context(open_sources(merge.recipe, self.host.resolve))
                plan = plan_merge(merge.recipe, sources)
                steps = tuple(step for step in plan.steps if step.key in rest)
                rest -= {step.key for step in steps}
                parts.append(run_plan(replace(plan, steps=steps), sources, output_device="cpu", cancel=self._cancel,
                                      mapped=True))
            if rest and live.source is not None:
                ckpt = opened.enter_context(open_checkpoint(live.source))
                in_file = [key for key in ckpt if key in rest]  # file order: sequential reads
                rest -= set(in_file)
                parts.append((key, ckpt[key]) for key in in_file)
            if rest:
                tensors = live.tensors()
                parts.append((key, tensors[key].detach().clone()) for key in sorted(rest) if key in tensors)
            yield itertools.chain(*parts)

    def _no_swap_reason(self) -> str:
        """The host's reason for not swapping into its loaded model (optional ``Host.no_swap_reason``), or ""."""
        reason = getattr(self.host, "no_swap_reason", None)
        return (reason() or "") if reason is not None else ""

    def _outcome(self, plan: MergePlan, swapped: bool, seconds: float, rewritten: int | None,
                 warnings: Iterable[str]) -> MergeOutcome:
        name = merge_name(plan.recipe, _model_names(plan.recipe))
        missing = (missing_message(plan),) if plan.missing else ()  # keys of A another input lacks, by name
        return MergeOutcome(name, plan.recipe, None, plan.count("merge"), swapped, seconds, plan.arch.label,
                            rewritten=rewritten, warnings=(*warnings, *missing))

    def _record(self, outcome: MergeOutcome, history_extra: Mapping[str, Any] | None = None) -> MergeOutcome:
        """The outcome's history line (its warnings kept in ``extra``), and the outcome with its ID."""
        extra = {**(history_extra or {}), **({"warnings": list(outcome.warnings)} if outcome.warnings else {})}
        models = {role: {"name": name} for role, name in _model_names(outcome.recipe).items()}
        entry = self.history.add(outcome.recipe, name=outcome.name, models=models, extra=extra or None)
        return replace(outcome, history_id=entry.id)

    def exclusive(self) -> contextlib.AbstractContextManager:
        """Hold the session for a run of merges and generations (an auto-merge search): merges, saves and
        restores from other threads are refused meanwhile, so no one swaps other weights in between a
        candidate's merge and the image scored for it.

        Example:
            >>> with session.exclusive():
            ...     session.merge(candidate); images = session.generate(params)
        """
        return self._held()

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner not in (None, me):
            raise MergeBusy("an auto-merge search holds the model; wait for it or stop it")
        outer, self._owner = self._owner, me
        if outer is None:
            self._halt.clear()
        try:
            yield
        finally:
            self._owner = outer

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        if self._owner not in (None, threading.get_ident()):
            raise MergeBusy("an auto-merge search holds the model; wait for it or stop it")
        if not self._busy.acquire(blocking=False):
            raise MergeBusy("a merge is already running; wait for it or press Stop")
        self._cancel.clear()
        try:
            yield
        finally:
            self._busy.release()


def _stem(source: Any) -> str:
    """The loaded checkpoint's name for a stack's bottom (no merge in it)."""
    return Path(source).stem if source else "the loaded model"


def _titles(layers: Iterable[Layer]) -> str:
    return ", then ".join(layer.title for layer in layers)


def _counted(pairs: Iterable[tuple[str, torch.Tensor]], total: int,
             on_progress: ProgressCallback | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``pairs``, calling ``on_progress(done, total, key)`` after each."""
    for done, (key, value) in enumerate(pairs, 1):
        yield key, value
        if on_progress is not None:
            on_progress(done, total, key)


def _model_names(recipe: Recipe) -> dict[str, str]:
    return {role: Path(getattr(recipe, role)).stem for role in ("model_a", "model_b", "model_c")
            if getattr(recipe, role)}


def same_but_ratios(old: Recipe, new: Recipe) -> bool:
    """Whether two recipes differ at most in per-key ratios, so one can be swapped in over the other.

    Example:
        >>> same_but_ratios(Recipe(model_a="a", model_b="b"), Recipe(model_a="a", model_b="b", alpha=0.9))
        True
    """
    return all(getattr(old, name) == getattr(new, name) for name in SAME_FOR_PARTIAL)


def changed_steps(old: MergePlan, new: MergePlan) -> tuple[KeyStep, ...]:
    """The steps of ``new`` whose output differs from ``old``'s for the same key (plans of one key list).

    Example:
        >>> len(changed_steps(plan_merge(recipe, s), plan_merge(recipe.with_changes(alpha=0.9), s)))
        1130
    """
    adjust_changed = old.recipe.adjust != new.recipe.adjust
    return tuple(step for before, step in zip(old.steps, new.steps, strict=True)
                 if _step_outcome(before) != _step_outcome(step)
                 or (adjust_changed and (before.adjust is not None or step.adjust is not None)))


def _step_outcome(step: KeyStep) -> tuple:
    """What decides a step's tensor, besides the recipe fields in SAME_FOR_PARTIAL and Adjust."""
    return step.spec, step.action, step.alpha, step.beta, step.channels
