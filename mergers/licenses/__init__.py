"""Licenses: what a merge may be used for, from its inputs' terms, before merging; written into the file.

Read without network access: the base model's license from the architecture, license fields in the
safetensors metadata, the info files downloader extensions keep beside models, a merged file's own
record, and the terms a user sets by hand (``MODEL.license.json``). docs/licenses.md says what is read
from where and how terms combine. An aid, not legal advice.

Example:
    >>> with open_sources(recipe) as sources:
    ...     merged = terms_of_sources(sources)
    >>> merged.license, merged.warnings
"""

from mergers.licenses.bases import BaseLicense, base_license, license_family
from mergers.licenses.combine import NOT_ADVICE, MergeTerms, combine_terms
from mergers.licenses.report import license_lines, made_from_lines, terms_of_models, terms_of_sources, terms_text
from mergers.licenses.sources import (
    LICENSE_KEY,
    InputTerms,
    read_input_terms,
    read_user_terms,
    user_terms_path,
    write_user_terms,
)
from mergers.licenses.terms import COMMERCIAL_USES, LicenseError, Terms, commercial_uses, terms_from_site

__all__ = [
    "COMMERCIAL_USES",
    "LICENSE_KEY",
    "NOT_ADVICE",
    "BaseLicense",
    "InputTerms",
    "LicenseError",
    "MergeTerms",
    "Terms",
    "base_license",
    "combine_terms",
    "commercial_uses",
    "license_family",
    "license_lines",
    "made_from_lines",
    "read_input_terms",
    "read_user_terms",
    "terms_from_site",
    "terms_of_models",
    "terms_of_sources",
    "terms_text",
    "user_terms_path",
    "write_user_terms",
]
