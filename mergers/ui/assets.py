"""The tab's ``style.css`` and ``javascript/*.js``, wherever this copy of ``mergers`` runs from.

A1111 and Forge load both from the extension's top level by themselves. The standalone app finds them
next to the package: in ``mergers/ui/assets/`` in an installed wheel (setup.py copies them there), else
at the top of the checkout (a clone, an editable install). Needs no Gradio.

Example:
    >>> "#supermerger_tabs" in stylesheet()
    True
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "assets"
CHECKOUT = Path(__file__).resolve().parents[2]


def asset_dir() -> Path:
    """The folder holding ``style.css`` and ``javascript/``: the packaged copy first, else the checkout's."""
    return PACKAGED if (PACKAGED / "style.css").is_file() else CHECKOUT


def stylesheet() -> str:
    """The tab's CSS (scoped to its elem ids)."""
    return (asset_dir() / "style.css").read_text(encoding="utf-8")


def scripts() -> list[str]:
    """The tab's scripts in the order A1111 loads an extension's ``javascript/`` (sorted by file name)."""
    return [path.read_text(encoding="utf-8") for path in sorted((asset_dir() / "javascript").glob("*.js"))]
