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
from mergers.session import MergeSession
from mergers.ui.tab import tab_contents

log = logging.getLogger(__name__)

TITLE = "SuperMerger"
START_TIMEOUT_S = 30.0  # uvicorn binds in well under a second; Gradio's startup events are quick too


def make_app(session: MergeSession) -> gr.Blocks:
    """A page holding the SuperMerger tab (queue it before serving, as :func:`make_server` does).

    Example:
        >>> make_app(MergeSession(host)).queue().launch()
    """
    with gr.Blocks(analytics_enabled=False, title=TITLE) as app:
        gr.Markdown(f"# {TITLE}")
        tab_contents(session)
    return app


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
