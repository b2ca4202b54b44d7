"""A model's terms of use, in the model site's own four permissions, and how terms combine.

Every field is ``None`` when it is not known: nothing is guessed. The permissions are Civitai's
(``allowNoCredit``, ``allowCommercialUse``, ``allowDerivatives``, ``allowDifferentLicense``) and
are read and written under those names, so a user can copy them from a model page.

Example:
    >>> strictest_terms([Terms(commercial=("Image", "Sell")), Terms(commercial=("Image",))]).commercial
    ('Image',)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from mergers.errors import MergeError

# Civitai's commercial uses, least to most: images made with the model, running it on Civitai's
# generator, renting it out elsewhere, selling it (the site's order, cumulative in its older single-value form).
COMMERCIAL_USES = ("Image", "RentCivit", "Rent", "Sell")
COMMERCIAL_WORDS = {"Image": "sell images", "RentCivit": "run it on Civitai's generator",
                    "Rent": "rent it out", "Sell": "sell it"}
PERMISSIONS = ("credit_required", "commercial", "derivatives", "different_license")
# Our field → the site's key (credit_required is the opposite of allowNoCredit).
SITE_KEYS = {"credit_required": "allowNoCredit", "commercial": "allowCommercialUse",
             "derivatives": "allowDerivatives", "different_license": "allowDifferentLicense"}


class LicenseError(MergeError):
    """A license file or field cannot be read; the message names the file."""


@dataclass(frozen=True)
class Terms:
    """What a model (or a merge) may be used for; ``None`` is unknown.

    ``commercial`` lists the allowed commercial uses among COMMERCIAL_USES (``()``: none).
    """

    license: Optional[str] = None
    credit_required: Optional[bool] = None
    commercial: Optional[tuple[str, ...]] = None
    derivatives: Optional[bool] = None
    different_license: Optional[bool] = None
    author: Optional[str] = None
    title: Optional[str] = None

    @property
    def known(self) -> bool:
        """Whether any permission is known."""
        return any(getattr(self, name) is not None for name in PERMISSIONS)

    def to_site(self) -> dict[str, Any]:
        """The terms under the site's key names (what MODEL.license.json and our metadata hold).

        Example:
            >>> Terms(credit_required=True, commercial=()).to_site()["allowCommercialUse"]
            ['None']
        """
        credit = None if self.credit_required is None else not self.credit_required
        commercial = None if self.commercial is None else list(self.commercial) or ["None"]
        data = {"license": self.license, "allowNoCredit": credit, "allowCommercialUse": commercial,
                "allowDerivatives": self.derivatives, "allowDifferentLicense": self.different_license,
                "creator": self.author, "name": self.title}
        return {key: value for key, value in data.items() if value is not None}


def terms_from_site(data: Mapping[str, Any], *, source: str) -> Terms:
    """Terms from a mapping with the site's keys (a downloaded info file, our own files); bad values
    raise LicenseError naming ``source``.

    Example:
        >>> terms_from_site({"allowCommercialUse": "Rent", "allowDerivatives": False}, source="a.info").commercial
        ('Image', 'RentCivit', 'Rent')
    """
    credit = _flag(data, "allowNoCredit", source)
    return Terms(license=_text(data.get("license")), credit_required=None if credit is None else not credit,
                 commercial=commercial_uses(data.get("allowCommercialUse"), source=source),
                 derivatives=_flag(data, "allowDerivatives", source),
                 different_license=_flag(data, "allowDifferentLicense", source),
                 author=_creator(data.get("creator")), title=_text(data.get("name")))


def commercial_uses(value: Any, *, source: str = "") -> Optional[tuple[str, ...]]:
    """``allowCommercialUse`` as the uses it allows: a list names them, a single value (the older
    form) means that use and all below it; "None" (or an empty list) allows none.

    Example:
        >>> commercial_uses(["Image", "Sell"]), commercial_uses("RentCivit"), commercial_uses("None")
        (('Image', 'Sell'), ('Image', 'RentCivit'), ())
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value == "None":
            return ()
        return COMMERCIAL_USES[: _use_index(value, source) + 1]
    if isinstance(value, (list, tuple)):
        named = {use for use in value if use != "None"}
        for use in named:
            _use_index(use, source)
        return tuple(use for use in COMMERCIAL_USES if use in named)
    raise LicenseError(f"{source}: allowCommercialUse must be a list or one of None, "
                       f"{', '.join(COMMERCIAL_USES)}; got {value!r}")


def _use_index(use: Any, source: str) -> int:
    if use not in COMMERCIAL_USES:
        raise LicenseError(f"{source}: unknown commercial use {use!r} (known: None, {', '.join(COMMERCIAL_USES)})")
    return COMMERCIAL_USES.index(use)


def _flag(data: Mapping[str, Any], key: str, source: str) -> Optional[bool]:
    value = data.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise LicenseError(f"{source}: {key} must be true or false, not {value!r}")


def _text(value: Any) -> Optional[str]:
    return value.strip() or None if isinstance(value, str) else None


def _creator(value: Any) -> Optional[str]:
    """The site's ``creator`` object (``{"username": ...}``), or a plain name in our own files."""
    return _text(value.get("username")) if isinstance(value, Mapping) else _text(value)


# --- the strictest of several terms ---------------------------------------------------------

def strictest(name: str, values: Iterable[Any]) -> Any:
    """The most restrictive known value of permission ``name`` (None when none is known): credit
    required if any requires it, the commercial uses all allow, a permission only if all give it.

    Example:
        >>> strictest("derivatives", [True, None, False]), strictest("credit_required", [None, False])
        (False, False)
    """
    known = [value for value in values if value is not None]
    if not known:
        return None
    if name == "commercial":
        return tuple(use for use in COMMERCIAL_USES if all(use in uses for uses in known))
    if name == "credit_required":
        return any(known)
    return all(known)


def strictest_terms(all_terms: Iterable[Terms]) -> Terms:
    """Field by field the strictest known permission; the first known license, author and title.

    Example:
        >>> strictest_terms([Terms(derivatives=True), Terms(derivatives=False, license="X")]).derivatives
        False
    """
    all_terms = list(all_terms)
    permissions = {name: strictest(name, (getattr(t, name) for t in all_terms)) for name in PERMISSIONS}
    names = {f.name: next((getattr(t, f.name) for t in all_terms if getattr(t, f.name) is not None), None)
             for f in fields(Terms) if f.name not in PERMISSIONS}
    return Terms(**names, **permissions)


def overridden(terms: Terms, by: Terms) -> Terms:
    """``terms`` with every field that ``by`` knows replaced (a user's own settings win)."""
    return replace(terms, **{f.name: getattr(by, f.name) for f in fields(Terms) if getattr(by, f.name) is not None})


def commercial_text(uses: Optional[tuple[str, ...]]) -> str:
    """The allowed commercial uses in words.

    Example:
        >>> commercial_text(("Image", "RentCivit")), commercial_text(())
        ("sell images, run it on Civitai's generator", 'none')
    """
    if uses is None:
        return "unknown"
    return ", ".join(COMMERCIAL_WORDS[use] for use in uses) or "none"
