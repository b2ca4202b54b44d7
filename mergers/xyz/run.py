"""Running an XYZ plan in a session: one merge per distinct recipe, then its cells' images.

:class:`PlotRunner` walks the plan's merges in order. Each merge is swapped in
with ``only_changed`` (a recipe that differs from the last one only in ratios
re-merges just the changed keys); every cell of that merge is then generated.
Stop ends the plot after the current cell; the result keeps what was made, so
the grid is drawn with the missing cells blank. :class:`PlotQueue` holds
reserved plots and runs them one after another.

Example:
    >>> runner = PlotRunner(session)
    >>> result = runner.run(plan, on_cell=lambda done, total, cell: print(done, total))
    >>> result.merges, result.stopped
    (9, False)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from mergers.engine import ProgressCallback
from mergers.errors import MergeError
from mergers.recipe import Recipe
from mergers.session import MergeOutcome, MergeSession, warnings_text
from mergers.xyz.plan import Cell, XyzPlan

log = logging.getLogger(__name__)

CellCallback = Callable[[int, int, Cell], None]  # (cells done, cells in all, the cell just made)


@dataclass(frozen=True)
class CellResult:
    """One generated cell: its first image, infotext, and the merge it was made with (as run)."""

    image: Image.Image
    infotext: str
    recipe: Recipe | None
    merge_name: str
    history_id: int | None


@dataclass
class PlotResult:
    """What a run made: cell index → result, how many merges, and why it ended early (if it did)."""

    plan: XyzPlan
    cells: dict[int, CellResult] = field(default_factory=dict)
    merges: int = 0
    partial_merges: int = 0  # merges that swapped only the keys whose ratio changed
    saved_models: list[str] = field(default_factory=list)
    stopped: bool = False
    error: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # the merges' warnings, in order
    restored: int | None = None  # options.restore: tensors put back after the plot

    @property
    def complete(self) -> bool:
        return len(self.cells) == len(self.plan.cells)

    @property
    def summary(self) -> str:
        made = f"{len(self.cells)} of {len(self.plan.cells)} cells, {self.merges} merges"
        partial = f" ({self.partial_merges} swapped only changed keys)" if self.partial_merges else ""
        ending = " — stopped" if self.stopped else f" — failed: {self.error}" if self.error else ""
        ending += "; the model was restored to its checkpoint" if self.restored is not None else ""
        return f"XYZ plot: {made}{partial} in {self.seconds:.1f} s{ending}" + warnings_text(self.warnings)


class PlotRunner:
    """Runs plans in one session; ``stop()`` (from another thread) ends the plot after the current cell."""

    def __init__(self, session: MergeSession):
        self.session = session
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self, plan: XyzPlan, *, on_cell: CellCallback | None = None,
            on_progress: ProgressCallback | None = None) -> PlotResult:
        """Merge each distinct recipe once and generate its cells; never raises for a failed cell:
        the result says what failed, and keeps the cells made before."""
        if not self.session.host.can_generate():
            raise MergeError("an XYZ plot needs an image generator; this host has none (run it in the web UI)")
        self._stop.clear()
        result = PlotResult(plan)
        started = time.perf_counter()
        try:
            for group in plan.groups:
                if self._stop.is_set() or not self._merge_and_generate(plan, group, result, on_cell, on_progress):
                    break
        finally:
            result.stopped = self._stop.is_set() and not result.complete
            if plan.spec.options.restore:
                self._restore(result)
            result.seconds = time.perf_counter() - started
        return result

    def _restore(self, result: PlotResult) -> None:
        """The plan's "restore" option: the checkpoint's own weights back, not the last cell's merge."""
        try:
            result.restored = self.session.restore()
        except MergeError as error:
            result.error = f"{result.error + '; ' if result.error else ''}restoring the model failed: {error}"

    def _merge_and_generate(self, plan: XyzPlan, group: tuple[int, ...], result: PlotResult,
                            on_cell: CellCallback | None, on_progress: ProgressCallback | None) -> bool:
        """One merge and its cells; False when the plot must end (stopped, or an error)."""
        first = plan.cells[group[0]]
        try:
            outcome = self.session.merge(first.recipe, on_progress=on_progress, only_changed=True)
            result.merges += 1
            result.warnings.extend(outcome.warnings)
            result.partial_merges += outcome.rewritten is not None
            if plan.spec.options.save_models:
                result.saved_models.append(self._save(outcome, result.merges))
            for index in group:
                self._generate(plan.cells[index], outcome, result)
                if on_cell is not None:
                    on_cell(len(result.cells), len(plan.cells), plan.cells[index])
                if self._stop.is_set():
                    return False
        except MergeError as error:
            result.error = f"cell {plan.label(first) or 1}: {error}"
            log.warning("XYZ plot ended: %s", result.error)
            return False
        return True

    def _generate(self, cell: Cell, outcome: MergeOutcome, result: PlotResult) -> None:
        generated = self.session.generate(cell.params)
        if not generated.images:
            raise MergeError("the generator returned no image")
        result.cells[cell.index] = CellResult(generated.images[0], generated.infotext, outcome.recipe,
                                              outcome.name, outcome.history_id)

    def _save(self, outcome: MergeOutcome, number: int) -> str:
        stem = f"xyz-{time.strftime('%Y%m%d-%H%M%S')}-{number:03d}"
        return str(self.session.save(stem))


@dataclass
class Reservation:
    """A reserved plot and where it is: waiting, running, finished, stopped or error."""

    id: int
    plan: XyzPlan
    status: str = "waiting"
    result: PlotResult | None = None


class PlotQueue:
    """Reserved plots, run one after another (the original's "Reserve XY plot").

    Example:
        >>> queue = PlotQueue()
        >>> queue.reserve(plan).id
        1
        >>> [r.status for r in queue.run_all(runner)]
        ['finished']
    """

    def __init__(self):
        self._items: list[Reservation] = []
        self._lock = threading.Lock()
        self._next_id = 1

    def reserve(self, plan: XyzPlan) -> Reservation:
        with self._lock:
            item = Reservation(self._next_id, plan)
            self._next_id += 1
            self._items.append(item)
            return item

    def remove(self, id: int) -> None:
        """Drop a reservation that is not running; -1 drops every one that is not running."""
        with self._lock:
            if id != -1 and not any(item.id == id for item in self._items):
                raise MergeError(f"there is no reservation {id}")
            self._items = [item for item in self._items if item.status == "running" or id not in (-1, item.id)]

    def items(self) -> list[Reservation]:
        with self._lock:
            return list(self._items)

    def run_all(self, runner: PlotRunner, *, on_cell: CellCallback | None = None,
                on_progress: ProgressCallback | None = None) -> list[Reservation]:
        """Run every waiting plot in turn; a stopped one ends the queue (the rest keep waiting)."""
        done = []
        while (item := self._next_waiting()) is not None:
            try:
                item.result = runner.run(item.plan, on_cell=on_cell, on_progress=on_progress)
            except MergeError as error:
                item.status = "error"
                item.result = None
                log.warning("reserved plot %d: %s", item.id, error)
                done.append(item)
                continue
            item.status = "stopped" if item.result.stopped else "error" if item.result.error else "finished"
            done.append(item)
            if item.result.stopped:
                break
        return done

    def _next_waiting(self) -> Reservation | None:
        with self._lock:
            item = next((item for item in self._items if item.status == "waiting"), None)
            if item is not None:
                item.status = "running"
            return item
