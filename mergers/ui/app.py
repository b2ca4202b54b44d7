"""The tab as a page of its own, for the standalone app.

Example:
    >>> launch(MergeSession(host), port=7860)
"""

from __future__ import annotations

import gradio as gr

from mergers.session import MergeSession
from mergers.ui.tab import tab_contents

TITLE = "SuperMerger"


def make_app(session: MergeSession) -> gr.Blocks:
    """A page holding the SuperMerger tab (queue it before launching, as :func:`launch` does).

    Example:
        >>> make_app(MergeSession(host)).queue().launch()
    """
    with gr.Blocks(analytics_enabled=False, title=TITLE) as app:
        gr.Markdown(f"# {TITLE}")
        tab_contents(session)
    return app


def launch(session: MergeSession, host: str = "127.0.0.1", port: int = 7860, **options) -> gr.Blocks:
    """Serve the page on ``host:port`` (the loopback by default) until interrupted.

    ``options`` go to ``Blocks.launch`` (e.g. ``prevent_thread_lock=True`` to return at once).

    Example:
        >>> launch(MergeSession(host), port=7861)
    """
    app = make_app(session)
    app.queue()  # progress bars and Stop beside a running merge need the queue
    app.launch(server_name=host, server_port=port, **options)
    return app
