"""SuperMerger's entry point in AUTOMATIC1111's web UI (and Forge, Forge Neo, reForge): thin glue, nothing else.

A1111 imports this file by path with the extension's folder first on ``sys.path``
while it loads, so ``mergers`` is ours. A1111's modules go into an ``A1111Host``,
the host into one ``MergeSession``, the session into the tab and, when the web UI
serves its own API (``--api`` or ``--nowebui``), into the HTTP API's routes
(``/supermerger/v1/...``, ``on_app_started``), guarded by ``--api-auth`` as A1111's are.
"""

import logging
from pathlib import Path

import torch
from modules import call_queue, devices, paths, processing, script_callbacks, scripts, sd_models, shared

if not hasattr(torch, "float8_e4m3fn"):  # what install.py warns of: fp8 dtypes arrived in torch 2.1
    raise ImportError(f"SuperMerger needs torch 2.1 or newer; this web UI runs torch {torch.__version__} "
                      "(A1111 v1.8+ installs 2.1; or set TORCH_COMMAND)")

import mergers
from mergers.hosts.a1111 import A1111Host, A1111Modules, session_for
from mergers.hosts.forge import A1111, ForgeHost, installed_webui

log = logging.getLogger("supermerger")

# basedir() is this extension's folder only while A1111 loads this file.
EXTENSION_DIR = Path(scripts.basedir())

if Path(mergers.__file__).resolve().parent != (EXTENSION_DIR / "mergers").resolve():
    raise ImportError(f"another extension's 'mergers' package ({mergers.__file__}) was imported first; "
                      f"SuperMerger needs its own, in {EXTENSION_DIR}")

# The same session after "Reload UI", so a merge swapped in before it can still be restored. On Forge and
# its forks the host swaps into Forge's model objects (or says why it cannot, e.g. reForge, NF4, GGUF).
session = session_for(A1111Modules(shared, sd_models, processing, call_queue, paths, devices),
                      extension_dir=EXTENSION_DIR,
                      host_class=A1111Host if installed_webui() == A1111 else ForgeHost)
host = session.host
script_callbacks.on_model_loaded(host.model_loaded)


class MergeInfotext(scripts.Script):
    """Always on, without a UI: images A1111 itself makes (txt2img, img2img) while a merge is swapped
    in name it in their infotext, with its history ID and recipe, as the tab's own previews do."""

    def title(self):
        return "SuperMerger"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        p.extra_generation_params.update(session.infotext())


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


def on_app_started(demo, app):
    """The HTTP API beside A1111's own, behind the same ``--api-auth`` credentials, when the user asks for an
    API (``--api``, ``--nowebui``); else only the routes of the swap indicator (``javascript/``)."""
    from mergers.api import webui_routers

    opts = shared.cmd_opts
    api = bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))
    for router in webui_routers(session, api=api, api_auth=getattr(opts, "api_auth", None),
                                gradio_auth=getattr(opts, "gradio_auth", None)):
        app.include_router(router)


script_callbacks.on_app_started(on_app_started)
