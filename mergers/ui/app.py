"""The standalone app: the tab as a page at ``/`` and the HTTP API beside it, in one server.

One FastAPI app holds the API's routes (``/supermerger/v1/...``, described at
``/docs`` and ``/openapi.json``) with the Gradio page mounted under them at ``/``;
uvicorn serves it. Both drive the same :class:`MergeSession`, so the API's
one-merge-at-a-time rule covers the page's merges too.

Example:
    >>> launch(MergeSession(FolderHost(Path("models"))), port=7860)          # until Ctrl+C
    >>> served = launch(session, port=7861, block=False); ...; served.close()  # in a thread
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import gradio as gr
import uvicorn
from fastapi import FastAPI

from mergers.api import make_router
from mergers.errors import MergeError
from mergers.host import Host
from mergers.session import MergeSession
from mergers.ui.assets import scripts, stylesheet
from mergers.ui.handlers import GALLERY, INFOTEXT
from mergers.ui.sections import GENERATION_PANEL, Widgets
from mergers.ui.tab import tab_contents

log = logging.getLogger(__name__)

TITLE = "SuperMerger"
START_TIMEOUT_S = 30.0  # uvicorn binds in well under a second; Gradio's startup events are quick too
# What does nothing without a web UI's loaded model and generator: hidden on such a host, not refused.
NEEDS_THE_WEB_UI = ("merge_and_gen", "gen", "restore", "load_model_a", GENERATION_PANEL, GALLERY, INFOTEXT)
PREVIEWS_NOTE = ("Merges are written to files here, with Save. Previews, Merge and Gen and Restore need "
                 "the web UI: install SuperMerger as an A1111 or Forge extension for them.")
GRADIO_3 = gr.__version__.startswith("3.")


def make_app(session: MergeSession) -> gr.Blocks:
    """A page holding the SuperMerger tab, with its style.css and javascript/ (queue it before serving,
    as :func:`make_server` does).

    Example:
        >>> make_app(MergeSession(host)).queue().launch()
    """
    with gr.Blocks(analytics_enabled=False, title=TITLE, css=stylesheet(), **_head()) as app:
        gr.Markdown(f"# {TITLE}")
        previews = has_previews(session.host)
        if not previews:
            gr.Markdown(PREVIEWS_NOTE, elem_id="supermerger_previews_note")
        widgets = tab_contents(session)
        if not previews:
            hide(widgets, NEEDS_THE_WEB_UI)
        if GRADIO_3:  # Gradio 3.41 has no head=: the scripts run from the page's load event instead
            app.load(None, None, None, _js=_scripts_as_load_function())
    return app


def has_previews(host: Host) -> bool:
    """Whether ``host`` can show previews: a generator, or a loaded model to swap merges into."""
    return host.can_generate() or host.live_model() is not None


def hide(widgets: Widgets, names: tuple[str, ...]) -> None:
    """Hide the components ``names`` (before the page's config is made, so they never show)."""
    for name in names:
        widgets[name].visible = False


def _head() -> dict[str, str]:
    """Gradio 4's ``head=``: the tab's scripts, inline (the page needs no route of ours to serve them)."""
    if GRADIO_3:
        return {}
    return {"head": "".join(f"<script>\n{script}\n</script>\n" for script in scripts())}


def _scripts_as_load_function() -> str:
    """The scripts as one JS function for Gradio 3.41's load event (each script is a self-calling function)."""
    return "() => {\n" + "\n".join(scripts()) + "\n}"


def make_server(session: MergeSession) -> FastAPI:
    """The API's routes with the page mounted at ``/`` (the routes come first, so the page
    never shadows them).

    Example:
        >>> uvicorn.run(make_server(MergeSession(host)), port=7860)
    """
    server = FastAPI(title=f"{TITLE} API", description="Merge Stable Diffusion checkpoints over HTTP.",
                     docs_url="/docs", redoc_url=None)
    server.include_router(make_router(session))
    page = make_app(session).queue()  # progress bars and Stop beside a running merge need the queue
    return gr.mount_gradio_app(server, page, path="/")


@dataclass
class Served:
    """A server running in a thread of this process (``launch(..., block=False)``)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def close(self) -> None:
        """Stop serving and wait for the server's thread."""
        self.server.should_exit = True
        self.thread.join(timeout=START_TIMEOUT_S)


def launch(session: MergeSession, host: str = "127.0.0.1", port: int = 7860, *,
           block: bool = True) -> Served | None:
    """Serve the page and the API on ``host:port`` (the loopback by default).

    ``block=True`` serves until interrupted; ``block=False`` serves from a thread and
    returns once the server listens.

    Example:
        >>> served = launch(MergeSession(host), port=7861, block=False)
        >>> served.close()
    """
    config = uvicorn.Config(make_server(session), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    url = f"http://{host}:{port}/"
    if block:
        log.warning("SuperMerger on %s (API: %sdocs)", url, url)
        server.run()
        return None
    thread = threading.Thread(target=server.run, name="supermerger-server", daemon=True)
    thread.start()
    _wait_until_started(server, thread, url)
    return Served(url, server, thread)


def _wait_until_started(server: uvicorn.Server, thread: threading.Thread, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise MergeError(f"could not serve on {url} (is the port in use?)")
        time.sleep(0.05)
