"""A merge's license report: from its opened inputs or from model names, and as lines of text.

Example:
    >>> with open_sources(recipe) as sources:
    ...     print("\\n".join(license_lines(terms_of_sources(sources))))
    license (an aid, not legal advice: read each model's license)
      model_a a.safetensors (SD1.x): CreativeML OpenRAIL-M; ...
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mergers.chain import RecipeCheckpoint, input_files, open_model
from mergers.errors import MergeError
from mergers.licenses.combine import NOT_ADVICE, MergeTerms, combine_terms
from mergers.licenses.sources import LICENSE_KEY, InputTerms, read_input_terms
from mergers.licenses.terms import Terms, commercial_text, terms_from_site
from mergers.plan import Sources
from mergers.recipe import MODEL_SLOTS

Resolver = Callable[[str], Path]


def terms_of_sources(sources: Sources) -> MergeTerms:
    """The terms of the merge of ``sources``: every file it reads, chained recipes followed through.

    Example:
        >>> terms_of_sources(sources).license
        'CreativeML OpenRAIL-M'
    """
    return combine_terms([read_input_terms(ckpt, role=role) for role, ckpt in input_files(sources).items()])


def terms_of_models(names: Sequence[str], resolve: Resolver) -> MergeTerms:
    """The terms of merging the models ``names`` (A first; a saved recipe's inputs followed through).

    Example:
        >>> terms_of_models(["a.safetensors", "b.safetensors"], resolve_path).terms.derivatives
    """
    roles = [*MODEL_SLOTS, *(f"more_models[{n}]" for n in range(max(0, len(names) - len(MODEL_SLOTS))))]
    with contextlib.ExitStack() as stack:
        opened = [(role, stack.enter_context(open_model(name, resolve))) for role, name in zip(roles, names)]
        return combine_terms([entry for role, model in opened for entry in _leaf_terms(role, model)])


def _leaf_terms(role: str, model) -> list[InputTerms]:
    if isinstance(model, RecipeCheckpoint):
        return [read_input_terms(ckpt, role=f"{role}.{inner}") for inner, ckpt in input_files(model.sources).items()]
    return [read_input_terms(model, role=role)]


def license_lines(merged: MergeTerms, *, combined: str = "merge", made_from: Sequence[str] = ()) -> list[str]:
    """The report as lines: each input's terms and their sources (and ``made_from``, a merged file's
    inputs), the merge's (labelled ``combined``), then notes and warnings.

    Example:
        >>> license_lines(merged)[-1]
        'warning: b.safetensors allows no derivatives: this merge should not be shared'
    """
    lines = [f"license ({NOT_ADVICE})"]
    for entry in merged.inputs:
        lines.append(f"  {entry.role} {entry.name} ({entry.architecture}): {terms_text(entry.terms, entry.license)}")
        lines.append(f"    from: {sources_text(entry)}")
    lines += made_from
    lines.append(f"  {combined}: {terms_text(merged.terms, merged.license, at_most=merged.commercial_at_most)}")
    lines += [f"  note: {note}" for note in merged.notes]
    lines += [f"warning: {warning}" for warning in merged.warnings]
    return lines


def terms_text(terms: Terms, license: str | None, *, at_most: tuple[str, ...] | None = None) -> str:
    """One line: license; credit; commercial use; derivatives; other license.

    Example:
        >>> terms_text(Terms(derivatives=False), "CreativeML OpenRAIL-M")
        'CreativeML OpenRAIL-M; credit: unknown; commercial use: unknown; derivatives: no; other license: unknown'
    """
    commercial = commercial_text(terms.commercial)
    if terms.commercial is None and at_most is not None:
        commercial = f"unknown (at most: {commercial_text(at_most)})"
    credit = {True: "required", False: "not required", None: "unknown"}[terms.credit_required]
    return (f"{license or 'unknown license'}; credit: {credit}; commercial use: {commercial}; "
            f"derivatives: {_yes_no(terms.derivatives)}; other license: {_yes_no(terms.different_license)}")


def sources_text(entry: InputTerms) -> str:
    """Where an input's terms came from, field by field, grouped by source."""
    by_source: dict[str, list[str]] = {}
    for name, source in entry.sources.items():
        by_source.setdefault(source, []).append(name.replace("_", " "))
    parts = [f"{source} ({', '.join(names)})" if len(by_source) > 1 else source for source, names in by_source.items()]
    if entry.base:
        parts.append(f"base license from the architecture ({entry.architecture})")
    return "; ".join(parts) or "nothing found: unknown"


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "unknown"}[value]


def made_from_lines(metadata: Mapping[str, str]) -> list[str]:
    """A merged file's inputs as its record lists them, with their terms then (``info`` shows them).

    Example:
        >>> made_from_lines(open_checkpoint("ab.safetensors").metadata)[0]
        '  made from: model_a a.safetensors: CreativeML OpenRAIL-M; credit: not required; ...'
    """
    try:
        inputs = json.loads(metadata[LICENSE_KEY])["inputs"]
        return [f"  made from: {i['role']} {i['name']}: "
                f"{terms_text(terms_from_site(i['terms'], source=LICENSE_KEY), i.get('license'))}" for i in inputs]
    except (KeyError, ValueError, TypeError, AttributeError, MergeError):  # no record, or not ours to read
        return []
