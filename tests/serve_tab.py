"""Serve the tab for the browser test, under whichever Gradio this Python has (3.41 or 4).

``python -m tests.serve_tab ROOT PORT`` serves, from one process (one Gradio import, not two):
- at ``/``: a page shaped like A1111's: its tab strip, a txt2img tab, and the SuperMerger tab (``build_tab``,
  rendered as A1111 renders an extension's tab), with the extension's ``javascript/*.js`` and ``style.css``
  put into the page the way A1111 v1.10 does it (``modules/ui_gradio_extensions.py``: script tags before
  ``</head>``, stylesheet links before ``</body>``, by wrapping Gradio's ``TemplateResponse``), over the test
  host (a loaded model and a generator), with SuperMerger's API routes beside it;
- at ``/standalone/``: ``python -m mergers ui``'s page over the demo models (it loads its assets itself).
Prints ``serving URL`` once the server listens, then serves until killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse

from mergers.api import make_router
from mergers.demo import ensure_demo_models
from mergers.hosts.standalone import FolderHost
from mergers.session import MergeSession
from mergers.ui.app import make_app
from mergers.ui.tab import build_tab
from tests.ui_host import UiHost

EXTENSION = Path(__file__).resolve().parents[1]
STANDALONE = "/standalone"


def a1111_like_page(session: MergeSession) -> gr.Blocks:
    """A1111's outline: tabs with elem_id ``tab_<id>``, each extension tab's Blocks (built first, as
    ``on_ui_tabs`` callbacks are) rendered inside."""
    tab = build_tab(session)
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as page:
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
                gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
            with gr.Tab("SuperMerger", elem_id="tab_supermerger"):
                tab.render()
    return page


def extension_tags() -> tuple[str, str]:
    """(before </head>, before </body>): the extension's scripts and stylesheet as A1111 links them."""
    scripts = "".join(f'<script type="text/javascript" src="/ext/javascript/{path.name}"></script>\n'
                      for path in sorted((EXTENSION / "javascript").glob("*.js")))
    return scripts, '<link rel="stylesheet" property="stylesheet" href="/ext/style.css">'


def wrap_template_response() -> None:
    """What A1111's ``reload_javascript`` does to every page Gradio renders (here: not the standalone app's)."""
    head, body = extension_tags()
    original = gr.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        response = original(*args, **kwargs)
        if _request_path(args, kwargs).startswith(STANDALONE):
            return response
        response.body = response.body.replace(b"</head>", f"{head}</head>".encode())
        response.body = response.body.replace(b"</body>", f"{body}</body>".encode())
        response.init_headers()
        return response

    gr.routes.templates.TemplateResponse = template_response


def _request_path(args, kwargs) -> str:
    context = args[1] if len(args) > 1 else kwargs.get("context", {})
    request = context.get("request") or kwargs.get("request")
    return f"{request.scope.get('root_path', '')}{request.url.path}" if request else ""


def serve(root: Path, port: int) -> None:
    session = MergeSession(UiHost.create(root))
    wrap_template_response()
    server = FastAPI()
    server.include_router(make_router(session))  # the swap indicator's routes (on_app_started)
    server.get("/ext/style.css")(lambda: FileResponse(EXTENSION / "style.css", media_type="text/css"))
    server.get("/ext/javascript/{name}")(lambda name: FileResponse(EXTENSION / "javascript" / Path(name).name,
                                                                   media_type="text/javascript"))
    # Mounted by Gradio on this server (a page inside a mounted sub-app would never start its queue).
    folder = ensure_demo_models(root / "demo")[0].parent
    standalone = make_app(MergeSession(FolderHost(folder, data_dir=root / "standalone"))).queue()
    server = gr.mount_gradio_app(server, standalone, path=STANDALONE)
    app = gr.mount_gradio_app(server, a1111_like_page(session).queue(), path="/")
    print(f"serving http://127.0.0.1:{port}/", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
