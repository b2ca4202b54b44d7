"""What is known about one input's terms, read from the file and the files beside it (no network).

In the order they win: the user's own ``MODEL.license.json`` (its fields replace any other);
then, the strictest of them field by field, a merged file's own record (``supermerger_license``),
the model-site info files that downloader extensions save (``MODEL.civitai.info``, ``MODEL.info``,
``MODEL.json``: the permissions at top level or under ``model``, the author under ``creator``) and
the safetensors metadata (``modelspec.license``, ``license``, ``modelspec.author``). A1111's own
user metadata (``MODEL.json`` with "description", "notes"…) holds no terms. The base license comes
from the architecture. A sidecar that cannot be read is named among the problems and ignored.

Example:
    >>> with open_checkpoint("models/a.safetensors") as ckpt:
    ...     read_input_terms(ckpt, role="model_a").terms.derivatives
    False
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from mergers.arch import detect_architecture
from mergers.checkpoint import Checkpoint
from mergers.errors import MergeError
from mergers.licenses.bases import BaseLicense, base_license, license_family
from mergers.licenses.terms import (
    PERMISSIONS,
    SITE_KEYS,
    LicenseError,
    Terms,
    overridden,
    strictest,
    terms_from_site,
)

LICENSE_KEY = "supermerger_license"  # our record in a merged file's metadata
USER_SUFFIX = ".license.json"  # the terms a user sets by hand, beside the model
SITE_SUFFIXES = (".civitai.info", ".info", ".json")  # downloader extensions' info files, A1111's user metadata
METADATA_LICENSE_KEYS = ("modelspec.license", "license")
METADATA_AUTHOR_KEY, METADATA_TITLE_KEY = "modelspec.author", "modelspec.title"
MAX_SIDECAR_BYTES = 8 * 2**20  # an info file is a few KB; a huge one is not ours to parse


@dataclass(frozen=True)
class InputTerms:
    """One input file's terms, where each came from, and what could not be read."""

    role: str
    name: str
    architecture: str  # e.g. "SD1.x", "Flux" ("unknown" when detection fails)
    base: Optional[BaseLicense]
    terms: Terms
    sources: Mapping[str, str] = field(default_factory=dict)  # field → where its value came from
    credits: tuple[str, ...] = ()  # "author (model)" to credit; a merged input carries its own inputs'
    problems: tuple[str, ...] = ()

    @property
    def license(self) -> Optional[str]:
        """The license the input is under: the one stated for it, else its base model's."""
        return self.terms.license or (self.base.license if self.base else None)

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "architecture": self.architecture,
                "license": self.license, "base_license": self.base.license if self.base else None,
                "terms": self.terms.to_site(), "sources": dict(self.sources), "credits": list(self.credits),
                "problems": list(self.problems)}


@dataclass(frozen=True)
class Finding:
    """Terms found in one place."""

    source: str
    terms: Terms
    credits: tuple[str, ...] = ()


def read_input_terms(ckpt: Checkpoint, *, role: str = "model_a") -> InputTerms:
    """Everything known about ``ckpt``'s terms (an open checkpoint: its header, metadata and sidecars).

    Example:
        >>> read_input_terms(open_checkpoint("flux1-dev.safetensors")).base.license
        'FLUX.1 [dev] Non-Commercial License'
    """
    architecture, base = _base(ckpt)
    findings, problems = _findings(ckpt)
    user, user_problems = read_user_terms(ckpt.path)
    terms, sources = _combined(findings)
    if user is not None:
        terms = overridden(terms, user.terms)
        sources = {**sources, **{name: user.source for name in _known_fields(user.terms)}}
    credits = _credits(terms, ckpt.name, findings)
    return InputTerms(role, ckpt.name, architecture, base, terms, sources, credits, (*problems, *user_problems))


def _base(ckpt: Checkpoint) -> tuple[str, Optional[BaseLicense]]:
    try:
        arch = detect_architecture(ckpt.shapes, ckpt.metadata, source=ckpt.name)
    except MergeError:
        return "unknown", None
    return arch.label, base_license(license_family(arch.family, ckpt.shapes))


def _findings(ckpt: Checkpoint) -> tuple[list[Finding], list[str]]:
    readers = [lambda: _stored_record(ckpt), lambda: _metadata_terms(ckpt)]
    readers += [functools.partial(read_site_file, path) for path in sidecar_paths(ckpt.path)]
    findings: list[Finding] = []
    problems: list[str] = []
    for read in readers:
        try:
            found = read()
        except LicenseError as error:  # an unreadable place is named and left out, never fatal
            problems.append(str(error))
            continue
        findings += [found] if found else []
    return findings, problems


def _combined(findings: list[Finding]) -> tuple[Terms, dict[str, str]]:
    """The strictest value of each permission, the first license/author/title, and their sources."""
    terms = Terms(**{f.name: next((getattr(x.terms, f.name) for x in findings
                                   if getattr(x.terms, f.name) is not None), None)
                     for f in fields(Terms) if f.name not in PERMISSIONS},
                  **{name: strictest(name, (getattr(x.terms, name) for x in findings)) for name in PERMISSIONS})
    return terms, {name: _deciding(name, getattr(terms, name), findings) for name in _known_fields(terms)}


def _deciding(name: str, value: Any, findings: list[Finding]) -> str:
    """Where ``value`` came from: the first place that gives a name; every place as strict as it for a permission."""
    given = [x for x in findings if getattr(x.terms, name) is not None]
    if name not in PERMISSIONS:
        return given[0].source
    return ", ".join(dict.fromkeys(x.source for x in given if strictest(name, [getattr(x.terms, name), value]) ==
                                   getattr(x.terms, name)))


def _known_fields(terms: Terms) -> list[str]:
    return [f.name for f in fields(Terms) if getattr(terms, f.name) is not None]


def _credits(terms: Terms, name: str, findings: list[Finding]) -> tuple[str, ...]:
    """Whom to credit: a merged input's own list, else this model's author (and its title) when known."""
    carried = [credit for x in findings for credit in x.credits]
    own = [f"{terms.author} ({terms.title or name})"] if terms.author else []
    return tuple(dict.fromkeys(carried or own))


# --- the places terms are read from ---------------------------------------------------------------

def sidecar_paths(model: Path) -> list[Path]:
    """The info files beside ``model`` that exist, in the order they are read (not the user's own file)."""
    stem = model.with_suffix("")
    return [path for path in (Path(f"{stem}{suffix}") for suffix in SITE_SUFFIXES) if path.is_file()]


def user_terms_path(model: Path) -> Path:
    """Where the terms a user sets for ``model`` live: ``MODEL.license.json`` beside it."""
    return Path(f"{Path(model).with_suffix('')}{USER_SUFFIX}")


def read_site_file(path: Path) -> Optional[Finding]:
    """Terms in a downloader's info file (permissions at top level or under ``model``), or None
    when it holds none (A1111's user metadata); LicenseError naming the file when it is not JSON."""
    data = _json_file(path)
    if not isinstance(data, Mapping):
        raise LicenseError(f"{path.name}: not a JSON object; ignored")
    nested = data.get("model") if isinstance(data.get("model"), Mapping) else {}
    merged = {**nested, **{key: value for key, value in data.items() if value is not None}}
    if not any(key in merged for key in (*SITE_KEYS.values(), "license")):
        return None
    merged["name"] = nested.get("name") or data.get("name")  # the model's name, not the version's
    merged["creator"] = data.get("creator") or nested.get("creator")
    return Finding(path.name, terms_from_site(merged, source=path.name))


def read_user_terms(model: Path) -> tuple[Optional[Finding], list[str]]:
    """The terms the user set for ``model`` (``MODEL.license.json``), and a problem if it is unreadable."""
    path = user_terms_path(model)
    if not path.is_file():
        return None, []
    try:
        data = _json_file(path)
        if not isinstance(data, Mapping):
            raise LicenseError(f"{path.name}: not a JSON object; ignored")
        return Finding(f"{path.name} (set by hand)", terms_from_site(data, source=path.name)), []
    except LicenseError as error:
        return None, [str(error)]


def write_user_terms(model: Path, terms: Terms) -> Path:
    """Save ``terms`` as ``MODEL.license.json`` beside ``model``, used from then on.

    Example:
        >>> write_user_terms(Path("models/a.safetensors"), Terms(derivatives=False)).name
        'a.license.json'
    """
    path = user_terms_path(model)
    text = json.dumps(terms.to_site(), indent=2, ensure_ascii=False) + "\n"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise LicenseError(f"{path}: cannot write the terms ({error.strerror or error})") from None
    return path


def _json_file(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise LicenseError(f"{path.name}: over {MAX_SIDECAR_BYTES // 2**20} MiB, not an info file; ignored")
        return json.loads(path.read_text(encoding="utf-8-sig"))  # some tools write a BOM
    except (OSError, UnicodeDecodeError) as error:
        raise LicenseError(f"{path.name}: cannot be read ({error}); ignored") from None
    except ValueError as error:
        raise LicenseError(f"{path.name}: not valid JSON ({error}); ignored") from None


def _stored_record(ckpt: Checkpoint) -> Optional[Finding]:
    """A merged file's own record: its combined terms and whom it credits."""
    text = ckpt.metadata.get(LICENSE_KEY)
    if text is None:
        return None
    source = f"{LICENSE_KEY} in {ckpt.name}"
    try:
        record = json.loads(text)
        terms = terms_from_site({**record["terms"], "license": record.get("license")}, source=source)
        credits = tuple(str(credit) for credit in record.get("credits", ()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise LicenseError(f"{source}: cannot be read ({error}); ignored") from None
    return Finding(source, terms, credits)


def _metadata_terms(ckpt: Checkpoint) -> Optional[Finding]:
    metadata = ckpt.metadata
    key = next((key for key in METADATA_LICENSE_KEYS if str(metadata.get(key, "")).strip()), None)
    author = str(metadata.get(METADATA_AUTHOR_KEY, "")).strip() or None
    if key is None and author is None:
        return None
    terms = Terms(license=str(metadata[key]).strip() if key else None, author=author,
                  title=str(metadata.get(METADATA_TITLE_KEY, "")).strip() or None)
    return Finding(f"{key or METADATA_AUTHOR_KEY} in {ckpt.name}", terms)
