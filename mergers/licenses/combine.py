"""A merge's terms: the most restrictive of all its inputs' (every model slot, chained recipes followed through).

- commercial use: only the uses every input (and every base license) allows;
- credit: required if any input requires it, naming whom to credit;
- derivatives: one input that allows none means the merge should not be shared;
- another license: inputs that forbid it bind the merge to their license (two such licenses conflict);
- OpenRAIL use restrictions carry over; base licenses that differ are named, all of them binding.

A permission that some input leaves unknown is unknown for the merge, unless a known input already
forbids it. This is an aid, not legal advice.

Example:
    >>> merged = combine_terms([read_input_terms(a, role="model_a"), read_input_terms(b, role="model_b")])
    >>> merged.license, merged.warnings[0]
    ('CreativeML OpenRAIL-M', 'b.safetensors allows no derivatives: this merge should not be shared')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

from mergers.licenses.sources import LICENSE_KEY, InputTerms
from mergers.licenses.terms import PERMISSIONS, Terms, commercial_text, strictest

NOT_ADVICE = "an aid, not legal advice: read each model's license"
RECORD_VERSION = 1
UNKNOWN = "unknown"
MODELSPEC_LICENSE = "modelspec.license"


@dataclass(frozen=True)
class MergeTerms:
    """The combined terms of a merge, with the inputs they come from and what the user should know."""

    inputs: tuple[InputTerms, ...]
    terms: Terms  # license is the combined name; each permission the strictest (None: unknown)
    commercial_at_most: Optional[tuple[str, ...]]  # the known inputs' limit when some are unknown
    credits: tuple[str, ...]
    warnings: tuple[str, ...]  # sharing or selling is not allowed, or cannot be known
    notes: tuple[str, ...]  # what carries over, and what could not be read

    @property
    def license(self) -> str:
        return self.terms.license or UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        """What the API returns and the merged file records (``supermerger_license``)."""
        terms = {key: value for key, value in self.terms.to_site().items() if key != "license"}
        return {"version": RECORD_VERSION, "license": self.license, "terms": terms,
                "commercial_at_most": list(self.commercial_at_most) if self.commercial_at_most is not None else None,
                "credits": list(self.credits), "warnings": list(self.warnings), "notes": list(self.notes),
                "inputs": [entry.to_dict() for entry in self.inputs], "disclaimer": NOT_ADVICE}

    def metadata(self) -> dict[str, str]:
        """The merged file's metadata keys: ``modelspec.license`` (when known) and our record."""
        record = {LICENSE_KEY: json.dumps(self.to_dict(), ensure_ascii=False)}
        return {**({MODELSPEC_LICENSE: self.terms.license} if self.terms.license else {}), **record}


def combine_terms(inputs: Sequence[InputTerms]) -> MergeTerms:
    """The merge's terms from its inputs' (in role order).

    Example:
        >>> combine_terms([sd1_open, sd1_no_derivatives]).terms.derivatives
        False
    """
    inputs = tuple(inputs)
    permissions = {name: _strictest_of(name, inputs) for name in PERMISSIONS}
    at_most = strictest("commercial", [_commercial(entry) for entry in inputs])
    if permissions["commercial"] is None and at_most == ():
        permissions["commercial"] = ()  # a known "none" decides, whatever the unknown ones allow
    terms = Terms(license=_license_name(inputs), **permissions)
    credits = tuple(dict.fromkeys(credit for entry in inputs if entry.terms.credit_required is not False
                                  for credit in entry.credits))
    merged = MergeTerms(inputs, terms, at_most, credits, (), ())
    return replace(merged, warnings=tuple(_warnings(merged)), notes=tuple(_notes(merged)))


def _commercial(entry: InputTerms) -> Optional[tuple[str, ...]]:
    """An input's commercial uses: its author's, within what its base license allows."""
    base = entry.base.commercial if entry.base else None
    if entry.terms.commercial is None:
        return () if base == () else None
    return strictest("commercial", [entry.terms.commercial, base])


def _strictest_of(name: str, inputs: tuple[InputTerms, ...]) -> Any:
    values = [_commercial(e) if name == "commercial" else getattr(e.terms, name) for e in inputs]
    if any(value is None for value in values):
        forbids = {"credit_required": True, "derivatives": False, "different_license": False}
        return forbids[name] if forbids.get(name, object()) in values else None
    return strictest(name, values)


def _license_name(inputs: tuple[InputTerms, ...]) -> Optional[str]:
    """One license when all agree, else the combination ("A + B"); None when none is known."""
    names = list(dict.fromkeys(entry.license or UNKNOWN for entry in inputs))
    return None if names == [UNKNOWN] or not names else " + ".join(names)


def _names(entries) -> str:
    return ", ".join(dict.fromkeys(entry.name for entry in entries))


def _warnings(merged: MergeTerms) -> list[str]:
    inputs, terms = merged.inputs, merged.terms
    found = []
    no_derivatives = [e for e in inputs if e.terms.derivatives is False]
    if no_derivatives:
        found.append(f"{_names(no_derivatives)} allows no derivatives: this merge should not be shared")
    found += _commercial_warnings(merged)
    found += _license_warnings(inputs)
    unknown = [e for e in inputs if not e.terms.known]
    if unknown:
        found.append(f"the terms of {_names(unknown)} are unknown: do not share or sell this merge until you "
                     "know them (set them by hand: MODEL.license.json)")
    if terms.credit_required and not merged.credits:
        found.append("credit is required, but no author is known: find whom to credit before sharing")
    return found


def _commercial_warnings(merged: MergeTerms) -> list[str]:
    if merged.terms.commercial == ():
        none = [e for e in merged.inputs if _commercial(e) == ()]
        return [(f"no commercial use: {_names(none)} allows none, so do not sell this merge, rent it out or "
                 "sell its images")]
    if merged.commercial_at_most is not None and "Sell" not in merged.commercial_at_most:
        limiting = [e for e in merged.inputs if _commercial(e) is not None and "Sell" not in _commercial(e)]
        return [(f"selling this merge is not allowed ({_names(limiting)}); allowed at most: "
                 f"{commercial_text(merged.commercial_at_most)}")]
    return []


def _license_warnings(inputs: tuple[InputTerms, ...]) -> list[str]:
    found = []
    bases = list(dict.fromkeys(e.base.license for e in inputs if e.base))
    if len(bases) > 1:
        found.append(f"the base models' licenses differ ({' + '.join(bases)}): the merge is bound by all of them")
    bound = [e for e in inputs if e.terms.different_license is False]
    licenses = list(dict.fromkeys(e.license or UNKNOWN for e in bound))
    if len(licenses) > 1:
        found.append(f"{_names(bound)} each require merges to keep their own license ({', '.join(licenses)}): "
                     "no license satisfies all of them, so this merge should not be shared")
    return found


def _notes(merged: MergeTerms) -> list[str]:
    inputs, terms = merged.inputs, merged.terms
    found = []
    if terms.credit_required and merged.credits:
        found.append(f"credit required: {'; '.join(merged.credits)}")
    bound = [e for e in inputs if e.terms.different_license is False]
    if bound and len({e.license for e in bound}) == 1:
        found.append(f"share it only under {bound[0].license or 'the same license'} ({_names(bound)} allows "
                     "no other license for merges)")
    rail = list(dict.fromkeys(e.base.license for e in inputs if e.base and e.base.use_restrictions))
    if rail:
        found.append(f"{' and '.join(rail)}: the use restrictions carry over; pass them (and the license text) on "
                     "to anyone who gets this merge")
    found += list(dict.fromkeys(e.base.note for e in inputs if e.base and e.base.note and not e.base.use_restrictions))
    found += [problem for e in inputs for problem in e.problems]
    return found
