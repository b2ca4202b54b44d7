"""SuperMerger's entry point in AUTOMATIC1111's web UI (and Forge): thin glue, nothing else.

A1111 imports this file by path with the extension's folder first on ``sys.path``
while it loads, so ``mergers`` is ours. A1111's modules go into an ``A1111Host``,
the host into one ``MergeSession``, the session into the tab. The HTTP API routes
(``on_app_started``) are not registered yet.
"""

import logging
from pathlib import Path

from modules import call_queue, devices, paths, processing, script_callbacks, scripts, sd_models, shared

import mergers
from mergers.hosts.a1111 import A1111Host, A1111Modules
from mergers.session import MergeSession

log = logging.getLogger("supermerger")

# basedir() is this extension's folder only while A1111 loads this file.
EXTENSION_DIR = Path(scripts.basedir())

if Path(mergers.__file__).resolve().parent != (EXTENSION_DIR / "mergers").resolve():
    raise ImportError(f"another extension's 'mergers' package ({mergers.__file__}) was imported first; "
                      f"SuperMerger needs its own, in {EXTENSION_DIR}")

host = A1111Host(A1111Modules(shared, sd_models, processing, call_queue, paths, devices), extension_dir=EXTENSION_DIR)
session = MergeSession(host)
script_callbacks.on_model_loaded(host.model_loaded)


def on_ui_tabs():
    """The SuperMerger tab, built by ``mergers.ui`` around the session."""
    return [(build_tab(session), "SuperMerger", "supermerger")]


try:
    from mergers.ui import build_tab
except ModuleNotFoundError as error:
    if not (error.name or "").startswith("mergers.ui"):
        raise
    log.warning("SuperMerger: mergers.ui is not installed, so there is no tab")
else:
    script_callbacks.on_ui_tabs(on_ui_tabs)
