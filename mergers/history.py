"""Merge history: every merge gets an ID and is kept with its recipe.

The history is one JSON object per line in ``<folder>/history.jsonl``. Each
line is appended with a single ``os.write`` on a file opened ``O_APPEND`` and
then fsynced, so a crash leaves whole lines or none. The original SuperMerger
kept ``mergehistory.csv`` (23 columns under a stale 16-name header);
:meth:`History.export_csv` writes that layout with a correct header.

IDs count from 1 (the original's first merge is 1). ``get(-1)`` is the last
merge and ``get(-2)`` the one before, as the original's "Load settings from: -1".
A line that cannot be read is never dropped silently: the file is set aside as
``history.jsonl.corrupt-<timestamp>``, the readable lines are written to a
fresh ``history.jsonl``, and :attr:`History.problems` says so.

Example:
    >>> history = History(Path("~/.local/share/supermerger").expanduser())
    >>> entry = history.add(recipe, name=merge_name(recipe, {"model_a": "a", "model_b": "b"}))
    >>> history.get(-1).id == entry.id
    True
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergers.errors import MergeError, OutputError, RecipeError
from mergers.methods.modes import MODES
from mergers.recipe import RECIPE_VERSION, Recipe
from mergers.weights import parse_weights

try:  # POSIX: flock; Windows: msvcrt byte locks. One of the two exists.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

log = logging.getLogger(__name__)

FILE_NAME = "history.jsonl"
TIME_FORMAT = "%Y.%m.%d %H.%M.%S"  # the original's "time" column
ROLES = ("model_a", "model_b", "model_c")
SHORTHASH_LENGTH = 10  # A1111's short hash: the first 10 hex digits of the sha256

# The original's mode column ("for compatible" in its rwmergelog): label, colon, formula.
MODE_FORMULAS = {
    "weight_sum": "A*(1-alpha)+B*alpha",
    "add_difference": "A+(B-C)*alpha",
    "triple_sum": "A*(1-alpha-beta)+B*alpha+C*beta",
    "sum_twice": "(A*(1-alpha)+B*alpha)*(1-beta)+C*beta",
}

# The 23 columns the original writes per row; its own header named only 16 of them.
CSV_HEADER = (
    "ID", "time", "name", "weights alpha", "weights beta", "model A", "model B", "model C",
    "alpha", "beta", "mode", "use MBW", "custom name", "save setting", "use ID", "elemental",
    "calcmode", "dice seed", "adjust", "gamma", "include/exclude", "include/exclude blocks",
    "include/exclude elements",
)


@dataclass(frozen=True)
class HistoryEntry:
    """One merge as it ran.

    Example:
        >>> entry = History(folder).get(-1)
        >>> entry.id, entry.recipe.mode
        (3, 'weight_sum')
    """

    id: int  # 1, 2, 3 … (the original's first merge is 1)
    time: str  # "YYYY.MM.DD HH.MM.SS", local time (the original's format)
    name: str  # the merge's display name
    recipe: Recipe  # as run: dice drawn and seeds resolved
    models: dict[str, dict[str, str]] = field(default_factory=dict)  # role → {"name", "sha256", "shorthash"}
    # What the caller made it for, e.g. {"search": {"run": "20250101-120000-ab12cd", "candidate": 3}}
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON object stored on this entry's line.

        Example:
            >>> HistoryEntry.from_dict(entry.to_dict()) == entry
            True
        """
        data = {"id": self.id, "time": self.time, "name": self.name,
                "recipe": self.recipe.to_dict(), "models": self.models}
        if self.extra:  # absent when empty: lines of plain merges stay as older supermergers wrote them
            data["extra"] = self.extra
        return data

    @classmethod
    def from_dict(cls, data: object) -> HistoryEntry:
        """Read a stored line's object; a RecipeError says what is wrong with it.

        Example:
            >>> HistoryEntry.from_dict(json.loads(line)).id
            4
        """
        if not isinstance(data, dict):
            raise RecipeError(f"expected a JSON object, not {type(data).__name__}")
        missing = [name for name in ("id", "time", "name", "recipe") if name not in data]
        if missing:
            raise RecipeError(f"missing {', '.join(missing)}")
        return cls(_entry_id(data["id"]), _text("time", data["time"]), _text("name", data["name"]),
                   _recipe(data["recipe"]), _models(data.get("models", {})), _extra(data.get("extra", {})))


class History:
    """The merges made with one data folder, oldest first on disk.

    Safe to share between threads, and between History objects (and processes)
    on the same folder: every read and append holds the object's lock and a lock
    file beside the history.

    Example:
        >>> history = History(tmp_path)
        >>> history.add(recipe, name="a x 0.5 + b x 0.5").id
        1
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self.problems: list[str] = []  # what went wrong reading the file, for the UI to show
        self._lock = threading.Lock()
        self._next_id: tuple[tuple[int, int], int] | None = None  # (file size, mtime) after our last write → next ID

    def add(self, recipe: Recipe, *, name: str, models: Mapping[str, Mapping[str, str]] | None = None,
            extra: Mapping[str, Any] | None = None) -> HistoryEntry:
        """Record a merge; its ID is the highest ID in the file plus one.

        ``extra``: JSON-able facts about why the merge was made (e.g. which search
        candidate it is), kept on the line as they are given.

        Example:
            >>> entry = history.add(recipe, name="a x 0.7 + b x 0.3", models={"model_a": {"shorthash": "0123456789"}})
            >>> entry.id
            6
        """
        if not isinstance(recipe, Recipe):
            raise RecipeError(f"history stores Recipes, not {type(recipe).__name__}")
        with self._locked():
            entry = HistoryEntry(self._take_next_id(), time.strftime(TIME_FORMAT), str(name or merge_name(recipe, {})),
                                 recipe, _models(models or {}), _extra(extra or {}))
            _append_line(self.path, _json_line(entry))
            self._next_id = (_stamp(self.path), entry.id + 1)
            return entry

    def _take_next_id(self) -> int:
        """The next ID (lock held): parsing the whole file only when someone else changed it since our
        last write (a long XYZ run or search adds hundreds of merges; each re-read took 0.1 s)."""
        if self._next_id is not None and self._next_id[0] == _stamp(self.path):
            return self._next_id[1]
        return self._load().next_id

    def get(self, id: int) -> HistoryEntry:
        """The merge with this ID, or counted from the end when negative (-1 = the last).

        Example:
            >>> history.get(-1).name
            'a x 0.7 + b x 0.3'
        """
        entries = self.entries(newest_first=False)
        found = _find(entries, id)
        if found is None:
            raise RecipeError(f"no merge with ID {id} in history ({_id_range(entries)})")
        return found

    def entries(self, *, limit: int | None = None, newest_first: bool = True) -> list[HistoryEntry]:
        """The merges, newest first by default; ``limit`` keeps the newest ``limit`` of them.

        Example:
            >>> [e.id for e in history.entries(limit=3)]
            [5, 4, 3]
        """
        with self._locked():
            kept = self._load().entries
        if limit is not None:
            kept = kept[max(len(kept) - max(limit, 0), 0):]
        return kept[::-1] if newest_first else kept

    def search(self, text: str, *, match_all: bool = True, limit: int | None = None) -> list[HistoryEntry]:
        """Merges whose row holds every word of ``text`` ("and"), or any word ("or"); newest first.

        Words are separated by spaces and compared case-insensitively with the
        entry's CSV row, its model names and hashes, as the original's search.

        Example:
            >>> [e.id for e in history.search("GRAD_V cosineA", match_all=False)]
            [5, 2]
        """
        words = text.lower().split()
        test = all if match_all else any
        hits = [e for e in self.entries() if not words or test(w in _search_text(e) for w in words)]
        return hits[:limit] if limit is not None else hits

    def export_csv(self, path: Path) -> Path:
        """Write the history as the original's ``mergehistory.csv`` (23 columns, true header).

        Example:
            >>> history.export_csv(Path("mergehistory.csv"))
            PosixPath('mergehistory.csv')
        """
        path = Path(path)
        rows = [CSV_HEADER, *(csv_row(e) for e in self.entries(newest_first=False))]
        _write_atomically(path, lambda file: csv.writer(file).writerows(rows))
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This object's lock, then the folder's lock file (other objects and processes)."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.folder / (FILE_NAME + ".lock")):
                yield

    def _load(self) -> _Loaded:
        """Read the file (lock held); set it aside and keep the good lines if any line is bad."""
        loaded = _parse_file(self.path)
        for note in loaded.notes:
            self._note(note)
        if loaded.bad:
            self._set_aside(loaded)
        return loaded

    def _set_aside(self, loaded: _Loaded) -> None:
        corrupt = _corrupt_name(self.path)
        for number, reason in loaded.bad:
            log.warning("%s line %d: %s", self.path, number, reason)
            self._note(f"{self.path} line {number} could not be read ({reason})")
        _keep_copy(self.path, corrupt)
        _write_atomically(self.path, lambda file: file.write("".join(loaded.good_lines)))
        log.warning("%s had %d unreadable line(s): the file was set aside as %s and its %d readable line(s) kept",
                    self.path, len(loaded.bad), corrupt.name, len(loaded.good_lines))
        self._note(f"{self.path.name} was set aside as {corrupt.name}; {len(loaded.good_lines)} readable "
                   f"line(s) were kept in a fresh {self.path.name}")

    def _note(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)


def _stamp(path: Path) -> tuple[int, int]:
    """The file's size and modification time (nanoseconds); (-1, -1) when it does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


def merge_name(recipe: Recipe, model_names: Mapping[str, str]) -> str:
    """The merge's display name, in the formats of the original's ``makemodelname``.

    Spacing is regular where the original's is not ("b -  c", "+b"); the saved
    file name drops every space, so it comes out the same as the original's.

    Example:
        >>> merge_name(Recipe(model_a="x/a.safetensors", model_b="b.ckpt", alpha=0.3), {})
        'a x 0.7 + b x 0.3'
    """
    a, b, c = (_model_name(recipe, role, model_names) for role in ROLES)
    if recipe.weights_alpha is not None:
        name = _block_name(recipe, a, b, c)
    else:
        name = _scalar_name(recipe, a, b, c)
    if recipe.calcmode != "normal":
        name += "_" + recipe.calcmode
        if recipe.calcmode == "tensor":
            name += f"_beta_{_base(recipe.weights_beta, recipe.beta)}"
    return name


def csv_row(entry: HistoryEntry) -> list[str]:
    """One history entry as the original's 23 CSV columns (see ``CSV_HEADER``).

    Example:
        >>> csv_row(history.get(1))[10]
        'Weight sum:A*(1-alpha)+B*alpha'
    """
    recipe = entry.recipe
    use_beta = recipe.weights_alpha is not None and recipe.weights_beta is not None
    return [
        str(entry.id), entry.time, entry.name,
        _weights_column(recipe.weights_alpha) if recipe.weights_alpha is not None else "",
        _weights_column(recipe.weights_beta) if use_beta else "",
        *(_shorthash(entry.models.get(role, {})) for role in ROLES),
        str(recipe.alpha), str(recipe.beta),
        f"{MODES[recipe.mode]}:{MODE_FORMULAS.get(recipe.mode, recipe.method.formula)}",
        str(recipe.weights_alpha is not None),
        "",  # custom name: ours is the display name, column 2
        str(_save_settings(recipe)), "[]",  # "save merged model ID to": nothing (the UI's choice)
        recipe.elemental or "", recipe.calcmode, str(recipe.dice.seed), recipe.adjust or "",
        str(recipe.gamma), recipe.include_exclude.capitalize(),
        str(_tokens(recipe.include_exclude_blocks)), recipe.include_exclude_elements or "",
    ]


# --- names -----------------------------------------------------------------------


def _scalar_name(recipe: Recipe, a: str, b: str, c: str) -> str:
    alpha, beta = recipe.alpha, recipe.beta
    if recipe.mode == "add_difference":
        return f"{a} + ({b} - {c}) x {_r(alpha)}"
    if recipe.mode == "triple_sum":
        return f"{a} x {_r(1 - alpha - beta)} + {b} x {_r(alpha)} + {c} x {_r(beta)}"
    if recipe.mode == "sum_twice":
        return f"({a} x {_r(1 - alpha)} + {b} x {_r(alpha)}) x {_r(1 - beta)} + {c} x {_r(beta)}"
    return f"{a} x {_r(1 - alpha)} + {b} x {_r(alpha)}"


def _block_name(recipe: Recipe, a: str, b: str, c: str) -> str:
    """With block weights the original shows BASE as alpha (and as beta with beta weights), then the list."""
    alpha, weights_a = _base(recipe.weights_alpha, recipe.alpha), _weights_column(recipe.weights_alpha)
    beta, weights_b = _base(recipe.weights_beta, recipe.beta), _weights_column(recipe.weights_beta)
    if recipe.mode == "add_difference":
        return f"{a} + ({b} - {c}) x alpha ({_r(alpha)},{weights_a})"
    if recipe.mode == "triple_sum":
        return (f"{a} x (1-alpha-beta) + {b} x alpha + {c} x beta "
                f"(alpha = {_r(alpha)},{weights_a},beta = {beta},{weights_b})")
    if recipe.mode == "sum_twice":
        return (f"({a} x (1-alpha) + {b} x alpha) x (1-beta) + {c} x beta "
                f"({_r(alpha)},{weights_a})_({_r(beta)},{weights_b})")
    return f"{a} x (1-alpha) + {b} x alpha ({_r(alpha)},{weights_a})"


def _r(value: float) -> str:
    """The original's ``str(round(value, 3))``: 0.7 → '0.7', 1 → '1.0'."""
    return str(round(value, 3))


def _model_name(recipe: Recipe, role: str, model_names: Mapping[str, str]) -> str:
    """The given name, else the file name without folder and extension (the original's ``filenamecutter``)."""
    given = model_names.get(role)
    if given:
        return str(given)
    path = getattr(recipe, role)
    return Path(path.replace("\\", "/")).stem if path else ""


# --- weights ---------------------------------------------------------------------


def _weight_values(text: str | None) -> list[float] | None:
    """The numbers of a weight string, or None when they cannot be told without the architecture.

    Number lists are read as given (26 or 20 values). Presets and the readable
    form resolve in the SD1 layout: SDXL's ids are a subset of SD1's in the same
    order, and the original turns those 26 values into SDXL's 20 by dropping
    IN09–IN11 and OUT09–OUT11, so the list means the same on either.
    """
    if text is None:
        return None
    if ":" not in text and "," in text:
        try:
            return [float(token) for token in text.split(",")]
        except ValueError:
            return None
    try:
        return list(parse_weights(text, "sd1").values)
    except MergeError:
        return None


def _weights_column(text: str | None) -> str:
    """A weight string as the original's comma list of ``str(float)`` (the text itself if unreadable)."""
    values = _weight_values(text)
    if values is None:
        return text or ""
    return ",".join(str(float(v)) for v in values)


def _base(text: str | None, scalar: float) -> float:
    """BASE (the first block weight), which the original uses as alpha/beta with block weights."""
    values = _weight_values(text)
    return values[0] if values else scalar


# --- CSV columns -----------------------------------------------------------------


def _shorthash(model: Mapping[str, str]) -> str:
    return model.get("shorthash") or (model.get("sha256") or "")[:SHORTHASH_LENGTH]


def _save_settings(recipe: Recipe) -> list[str]:
    """The original's "save settings" checkboxes that the recipe implies, in its order."""
    settings = ["safetensors"]  # our output is always safetensors
    if recipe.dtype == "fp16":
        settings.append("fp16")
    if recipe.prune:
        settings.append("prune")
    if recipe.reset_clip:
        settings.append("Reset CLIP ids")
    return settings


def _tokens(text: str | None) -> list[str]:
    """Include/exclude blocks as the original stores its checkbox list."""
    return [token for token in re.split(r"[\s,]+", text or "") if token]


def _search_text(entry: HistoryEntry) -> str:
    models = [value for model in entry.models.values() for value in model.values()]
    paths = [getattr(entry.recipe, role) or "" for role in ROLES]
    return " ".join([*csv_row(entry), *models, *paths]).lower()


# --- reading and repairing the file ----------------------------------------------------


@dataclass
class _Loaded:
    """What one read of the file found."""

    entries: list[HistoryEntry] = field(default_factory=list)
    good_lines: list[str] = field(default_factory=list)  # lines to keep if the file is rewritten
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    notes: list[str] = field(default_factory=list)  # kept but not shown (a newer supermerger's lines)
    next_id: int = 1


def _parse_file(path: Path) -> _Loaded:
    loaded = _Loaded()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return loaded
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            _parse_line(path, number, raw, loaded)
    return loaded


def _parse_line(path: Path, number: int, raw: bytes, loaded: _Loaded) -> None:
    try:
        line = raw.decode("utf-8")
        data = json.loads(line)
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        loaded.bad.append((number, f"not valid JSON: {error}"))
        return
    newer = _newer_version(data)
    if newer is not None:  # a newer supermerger's line: keep it and its ID, don't show it
        loaded.notes.append(f"{path} line {number}: ID {newer} was written by a newer supermerger; skipped")
        loaded.good_lines.append(line.rstrip("\r") + "\n")
        loaded.next_id = max(loaded.next_id, newer + 1)
        return
    try:
        entry = HistoryEntry.from_dict(data)
    except (MergeError, TypeError, ValueError) as error:
        loaded.bad.append((number, f"not a valid history entry: {error}"))
        return
    loaded.entries.append(entry)
    loaded.good_lines.append(line.rstrip("\r") + "\n")
    loaded.next_id = max(loaded.next_id, entry.id + 1)


def _newer_version(data: object) -> int | None:
    """The entry's ID when its recipe has a version this supermerger does not know, else None."""
    if not isinstance(data, dict) or not isinstance(data.get("recipe"), dict):
        return None
    version = data["recipe"].get("version")
    if not isinstance(version, int) or version <= RECIPE_VERSION:
        return None
    try:
        return _entry_id(data.get("id"))
    except RecipeError:
        return None


def _find(entries: list[HistoryEntry], id: int) -> HistoryEntry | None:
    if isinstance(id, bool) or not isinstance(id, int):
        raise RecipeError(f"a history ID is a whole number, not {id!r}")
    if id < 0:
        return entries[id] if -id <= len(entries) else None
    return next((entry for entry in entries if entry.id == id), None)


def _id_range(entries: list[HistoryEntry]) -> str:
    if not entries:
        return "it is empty"
    ids = [entry.id for entry in entries]
    return f"{min(ids)}–{max(ids)}"


def _entry_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"id must be a whole number from 1, not {value!r}")
    return value


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise RecipeError(f"{name} must be text, not {value!r}")
    return value


def _recipe(value: object) -> Recipe:
    if not isinstance(value, dict):
        raise RecipeError(f"recipe must be a JSON object, not {value!r}")
    return Recipe.from_dict(value)


def _extra(value: object) -> dict[str, Any]:
    """A JSON object (its keys text), kept as given."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise RecipeError(f"extra must be a JSON object, not {value!r}")
    return dict(value)


def _json_line(entry: HistoryEntry) -> str:
    """The entry as one JSON line; an ``extra`` JSON cannot hold is refused before anything is written."""
    try:
        return json.dumps(entry.to_dict(), ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"history entry {entry.id} ({entry.name}): extra is not plain JSON: {error}") from None


def _models(value: object) -> dict[str, dict[str, str]]:
    """Role → {field: text}; values are kept as text, anything else is refused."""
    if not isinstance(value, Mapping):
        raise RecipeError(f"models must map roles to details, not {value!r}")
    models = {}
    for role, details in value.items():
        if not isinstance(details, Mapping):
            raise RecipeError(f"models[{role!r}] must map fields to text, not {details!r}")
        models[str(role)] = {str(k): str(v) for k, v in details.items() if v is not None}
    return models


# --- file operations -------------------------------------------------------------


def _append_line(path: Path, line: str) -> None:
    """One ``os.write`` of the whole line on an O_APPEND file, then fsync: no half lines from us."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o644)
    try:
        data = (line + "\n").encode("utf-8")
        if _lacks_final_newline(fd):  # a hand-edited last line: don't glue ours onto it
            data = b"\n" + data
        written = os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if written != len(data):
        raise OutputError(f"{path}: wrote {written} of {len(data)} bytes of the history line (disk full?)")


def _lacks_final_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    os.lseek(fd, size - 1, os.SEEK_SET)
    return os.read(fd, 1) != b"\n"


def _write_atomically(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:  # no newline translation
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _corrupt_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
        number += 1
    return candidate


def _keep_copy(path: Path, corrupt: Path) -> None:
    """The damaged file under its new name; a hard link, so ``path`` is never missing meanwhile."""
    try:
        os.link(path, corrupt)
    except OSError:  # no hard links here (some network or FAT drives): copy instead
        shutil.copy2(path, corrupt)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held while the block runs (flock, or msvcrt on Windows)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
    try:
        _lock(fd, locked=True)
        try:
            yield
        finally:
            _lock(fd, locked=False)
    finally:
        os.close(fd)


def _lock(fd: int, *, locked: bool) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX if locked else fcntl.LOCK_UN)
    else:  # Windows: lock byte 0
        os.lseek(fd, 0, os.SEEK_SET)
        if not locked:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            return
        _windows_lock(fd)


def _windows_lock(fd: int, *, timeout: float = 120.0) -> None:
    """Wait for the byte lock: msvcrt's own LK_LOCK gives up after 10 tries (about 10 s), too soon for
    a tab, the API and an XYZ plot writing history at once."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise OutputError(f"the history file stayed locked for {timeout:.0f} s; is another "
                                  "supermerger stuck?") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
