"""Every layout and architecture we know: the shipped files, then the user's files over them.

Shipped: ``mergers/arch/data/layouts/*.json``. Yours: ``$SUPERMERGER_LAYOUTS`` (a folder), else
``~/.config/supermerger/layouts/``; a file there adds a model, or replaces a shipped layout or architecture of
the same name. The registry is read again when a file there is added, changed or removed (seen within 2 s).

Example:
    >>> layout_named("flux").blocks[:4]
    ('CLIP', 'T5', 'IN', 'D00')
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import pathlib
import time
from dataclasses import dataclass

from mergers.arch.auto import AUTO_PREFIX, auto_layout_from_name
from mergers.arch.spec import ArchSpec, DetectRule, Layout, LayoutFileError, parse_architecture, parse_layout

USER_LAYOUTS_ENV = "SUPERMERGER_LAYOUTS"
SHIPPED_FOLDER = "data/layouts"
USER_PRIORITY = 200  # a user's architecture without a priority is tried before every shipped one
RECHECK_SECONDS = 2.0  # how soon a file added to, changed in or removed from the user's folder is seen
_folder_seen: dict[tuple, tuple[float, str, tuple]] = {}  # (env, home) -> (when, folder, signature)


@dataclass(frozen=True)
class Registry:
    """Layouts and architectures by name, and the detection rules in the order they are tried."""

    layouts: dict[str, Layout]
    architectures: dict[str, ArchSpec]

    @functools.cached_property
    def detection_order(self) -> tuple[tuple[DetectRule, ArchSpec], ...]:
        rules = [(rule, spec) for spec in self.architectures.values() for rule in spec.detect]
        return tuple(sorted(rules, key=lambda pair: -pair[0].priority))  # stable: file order breaks ties


def user_layouts_dir() -> pathlib.Path:
    """``$SUPERMERGER_LAYOUTS`` if set, else ``~/.config/supermerger/layouts``.

    Example:
        >>> user_layouts_dir().name in ("layouts", os.environ.get("SUPERMERGER_LAYOUTS", "layouts").rstrip("/").split("/")[-1])
        True
    """
    override = os.environ.get(USER_LAYOUTS_ENV)
    if override:
        return pathlib.Path(override).expanduser()
    return pathlib.Path.home() / ".config" / "supermerger" / "layouts"


def registry() -> Registry:
    """The shipped layouts with the user's folder read over them (cached until a file there changes).

    Example:
        >>> "qwen_image" in registry().architectures
        True
    """
    # Asked for every key of a merge: the folder is looked at again only after RECHECK_SECONDS (scanning it
    # on every call cost a quarter of a small merge's time); a new env or home folder is looked at at once.
    where = (os.environ.get(USER_LAYOUTS_ENV), os.environ.get("HOME"), os.environ.get("USERPROFILE"))
    now = time.monotonic()
    seen = _folder_seen.get(where)
    if seen is None or now - seen[0] > RECHECK_SECONDS:
        folder = user_layouts_dir()
        seen = _folder_seen[where] = (now, str(folder), _folder_signature(folder))
    return _registry(seen[1], seen[2])


def shipped_registry() -> Registry:
    """The shipped layouts alone: what module constants are built from, so a broken user file cannot
    stop the package from importing (it is reported when a model is read).

    Example:
        >>> shipped_registry().layouts["sdxl"].blocks[:2]
        ('BASE', 'IN00')
    """
    return _registry("", ())


def layout_named(name: str) -> Layout:
    """The layout called ``name`` (shipped, the user's, or an automatic ``auto:…`` one).

    Example:
        >>> len(layout_named("sd1").blocks)
        26
    """
    if name.startswith(AUTO_PREFIX):
        return auto_layout_from_name(name)
    layouts = registry().layouts
    if name not in layouts:
        raise LayoutFileError(f"unknown layout {name!r}; known: {', '.join(layouts)}")
    return layouts[name]


def arch_spec(family: str) -> ArchSpec | None:
    """The architecture called ``family``, or None when no file defines it.

    Example:
        >>> arch_spec("chroma").layout
        'chroma'
    """
    return registry().architectures.get(family)


def read_layout_file(path: pathlib.Path, *, default_priority: int) -> tuple[list[Layout], list[ArchSpec]]:
    """The layouts and architectures of one file; a LayoutFileError naming the file if it is malformed.

    Example:
        >>> import tempfile; p = pathlib.Path(tempfile.mkdtemp()) / "x.json"
        >>> _ = p.write_text('{"layouts": []}', encoding="utf-8")
        >>> read_layout_file(p, default_priority=200)
        ([], [])
    """
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # utf-8-sig: Windows editors add a BOM
    except (OSError, UnicodeDecodeError) as error:
        raise LayoutFileError(f"cannot read layout file {where}: {error}") from error
    except json.JSONDecodeError as error:
        raise LayoutFileError(f"{where}: not valid JSON: {error}") from error
    if not isinstance(data, dict) or not set(data) <= {"about", "layouts", "architectures"}:
        raise LayoutFileError(f"{where}: expected an object with 'layouts' and/or 'architectures' "
                              f"(and 'about'); got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    layouts = [parse_layout(entry, f"{where}: layouts[{n}]", source=where)
               for n, entry in enumerate(_entries(data, "layouts", where))]
    archs = [parse_architecture(entry, f"{where}: architectures[{n}]", default_priority=default_priority, source=where)
             for n, entry in enumerate(_entries(data, "architectures", where))]
    return layouts, archs


def _entries(data: dict, field: str, where: str) -> list:
    value = data.get(field, [])
    if not isinstance(value, list):
        raise LayoutFileError(f"{where}: {field} must be a list […]")
    return value


def _folder_signature(folder: pathlib.Path) -> tuple[tuple[str, int, int], ...]:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:  # no folder: no user layouts
        return ()
    return tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.name.endswith(".json"))


@functools.cache
def _registry(folder: str, signature: tuple) -> Registry:
    layouts: dict[str, Layout] = {}
    archs: dict[str, ArchSpec] = {}
    for path in _shipped_files():
        _add(layouts, archs, *read_layout_file(path, default_priority=80))
    for name, _, _ in signature:
        _add(layouts, archs, *read_layout_file(pathlib.Path(folder) / name, default_priority=USER_PRIORITY))
    _check_layouts_exist(layouts, archs)
    return Registry(layouts, archs)


def _add(layouts: dict, archs: dict, new_layouts: list[Layout], new_archs: list[ArchSpec]) -> None:
    layouts.update((layout.name, layout) for layout in new_layouts)
    for spec in new_archs:
        archs.pop(spec.name, None)  # a replaced architecture moves to its new file's place in the order
        archs[spec.name] = spec


def _check_layouts_exist(layouts: dict[str, Layout], archs: dict[str, ArchSpec]) -> None:
    for spec in archs.values():
        if spec.layout not in layouts:
            raise LayoutFileError(f"{spec.source}: architecture {spec.name!r}: layout {spec.layout!r} is not defined "
                                  f"in any layout file; known: {', '.join(layouts)}")


@functools.cache
def _shipped_files() -> tuple[pathlib.Path, ...]:
    folder = importlib.resources.files("mergers.arch").joinpath(SHIPPED_FOLDER)
    with importlib.resources.as_file(folder) as path:
        return tuple(sorted(pathlib.Path(path).glob("*.json")))
