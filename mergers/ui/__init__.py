"""The SuperMerger tab (Gradio 3.41 and 4): fields, handlers, the builder and the standalone page.

``mergers.ui.fields`` needs no Gradio; the rest imports it when first used.

Example:
    >>> from mergers.ui import build_tab, recipe_from_ui, ui_from_recipe
"""

from __future__ import annotations

import importlib

from mergers.ui.fields import FIELDS, recipe_from_ui, ui_from_recipe

_LAZY = {"build_tab": "mergers.ui.tab", "tab_contents": "mergers.ui.tab", "TabActions": "mergers.ui.handlers",
         "make_app": "mergers.ui.app", "launch": "mergers.ui.app"}

__all__ = ["FIELDS", "TabActions", "build_tab", "launch", "make_app", "recipe_from_ui", "tab_contents",
           "ui_from_recipe"]


def __getattr__(name: str):
    """Import the Gradio parts only when asked for (``from mergers.ui import build_tab``)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergers.ui' has no attribute {name!r}")
