"""The standalone page in a real headless Chromium: pick models, set a preset, Merge, Save; and the swap
indicator (``javascript/``) on a page shaped like A1111's top bar.

Needs Debian's Chromium (``apt-get install -y chromium``) and Playwright from pip
(``pip install playwright``; its own browser download is not used). Skipped when
either is missing. Screenshots are test artefacts, left in ``$SUPERMERGER_ARTEFACTS``
(default: the system temp folder) as ``supermerger-tab.png``, ``supermerger-history.png``,
``supermerger-saved.png`` and ``supermerger-indicator.png`` for a person (or CI's artefact upload) to look at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

from mergers.checkpoint import open_checkpoint
from mergers.demo import ensure_demo_models
from mergers.hosts.standalone import FolderHost
from mergers.metadata import stored_recipe
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.ui.app import launch
from tests.live_model import FakeLive
from tests.ui_host import UiHost, weights_checksum

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("SUPERMERGER_ARTEFACTS") or tempfile.gettempdir()) / "supermerger-tab.png"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")


def free_port() -> int:
    """A port nothing listens on now, on the loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(session: MergeSession):
    """The page and the API served on the loopback from a thread of this process."""
    try:
        return launch(session, port=free_port(), block=False)
    except ValueError as error:  # Gradio's "localhost is not accessible": its own page failed to render
        pytest.fail(f"Gradio could not serve the page ({error}); Gradio 4.44 needs starlette<1, "
                    "Gradio 3.41 needs fastapi==0.94.0 (see the server's traceback above)")


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The test host (a loaded model, so merges swap in); yields (url, host)."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    host = UiHost.create(tmp_path)
    server = serve(MergeSession(host))
    try:
        yield server.url, host
    finally:
        server.close()


@pytest.fixture
def served_demo(tmp_path, monkeypatch):
    """``python -m mergers ui``'s set-up: the demo models in a folder, no loaded model; yields (url, host)."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    folder = ensure_demo_models(tmp_path / "demo")[0].parent
    host = FolderHost(folder, data_dir=tmp_path / "data")
    server = serve(MergeSession(host))
    try:
        yield server.url, host
    finally:
        server.close()


@contextlib.contextmanager
def browser_page(url: str):
    """A Chromium page that may reach the served page only (web fonts and the like are refused)."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                       else route.abort())
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(served):
    with browser_page(served[0]) as page:
        yield page


@pytest.fixture
def demo_page(served_demo):
    with browser_page(served_demo[0]) as page:
        yield page


def choose(page, field: str, option: str) -> None:
    """Pick ``option`` in the model dropdown ``field`` (Gradio 3.41 and 4 mark options alike)."""
    block = page.locator(f"#supermerger_{field}").first
    block.get_by_role("combobox").or_(block.locator("input")).first.click()
    block.locator(f'[data-testid="dropdown-option"][aria-label="{option}"]').click()


def test_merge_from_the_page(page, served):
    url, host = served
    before = weights_checksum(host.live_model().tensors())
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_label("Model A", exact=True).first.wait_for()
    titles = [entry.title for entry in host.list_models()]
    choose(page, "model_a", titles[0])
    choose(page, "model_b", titles[1])
    page.locator("#supermerger_merge").click()
    message = page.locator("#supermerger_message").first  # Gradio 3.41 gives the id to two nested elements
    message.get_by_text("keys merged").wait_for()
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert "a x 0.5 + b x 0.5 (ID 1)" in message.inner_text()
    assert weights_checksum(host.live_model().tensors()) != before
    tab = page.get_by_role("tab", name="History")  # Gradio 4; Gradio 3.41's tabs are plain buttons
    tab.or_(page.get_by_role("button", name="History", exact=True)).click()
    page.get_by_text("a x 0.5 + b x 0.5", exact=True).filter(visible=True).first.wait_for()
    page.screenshot(path=str(SCREENSHOT.with_name("supermerger-history.png")))
    page.get_by_role("button", name="Load settings", exact=True).click()
    message.get_by_text("loaded the settings of ID 1").wait_for()  # visible: back on the Merge tab


def choose_labelled(page, label: str, option: str) -> None:
    """Pick ``option`` in the dropdown labelled ``label``."""
    page.get_by_label(label, exact=True).first.click()
    page.locator(f'[data-testid="dropdown-option"][aria-label="{option}"]').first.click()


def set_alpha_until(page, start: str, tries: int = 10) -> None:
    """Press "Set alpha" until the alpha box starts with ``start`` (the preset's slider update may still run)."""
    box = page.get_by_label("weights for alpha").first  # its name holds the info line too
    for _ in range(tries):
        page.get_by_role("button", name="Set alpha", exact=True).click()
        try:
            page.wait_for_function(f"el => el.value.startsWith({start!r})", arg=box.element_handle(), timeout=2000)
            return
        except sync_api.TimeoutError:
            continue
    pytest.fail(f"the alpha box never showed the preset: {box.input_value()!r}")


def test_merge_with_a_preset_and_save_the_file(demo_page, served_demo):
    """What a new user does with ``python -m mergers ui``: two demo models, GRAD_V, Merge, Save."""
    page, (url, host) = demo_page, served_demo
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_label("Model A", exact=True).first.wait_for()
    titles = [entry.title for entry in host.list_models()]
    choose(page, "model_a", titles[0])
    choose(page, "model_b", titles[1])
    page.get_by_label("use MBW", exact=True).first.check()
    choose_labelled(page, "Select preset", "GRAD_V")
    set_alpha_until(page, "0,1,0.9")  # the preset's sliders → the alpha box
    page.locator("#supermerger_merge").click()
    message = page.locator("#supermerger_message").first
    message.get_by_text("keys merged").wait_for()
    assert "no model loaded: Save writes it" in message.inner_text()
    page.get_by_text("Save", exact=True).first.click()  # open the accordion
    page.get_by_label("File name (empty: the merge's name)", exact=True).fill("browser merge")
    page.get_by_role("button", name="Save", exact=True).click()
    message.get_by_text("saved").wait_for()
    page.screenshot(path=str(SCREENSHOT.with_name("supermerger-saved.png")), full_page=True)
    saved = host.models_dir / "browser merge.safetensors"
    assert saved.is_file() and str(saved) in message.inner_text()
    with open_checkpoint(saved) as ckpt:
        recipe, models = stored_recipe(ckpt.metadata)
    assert recipe.weights_alpha.startswith("0,1,0.9") and models["model_b"]["name"] == Path(titles[1]).name


# --- the swap indicator beside A1111's checkpoint selector (javascript/supermerger_state.js) -----------------

INDICATOR_JS = Path(__file__).resolve().parents[1] / "javascript" / "supermerger_state.js"
# The part of A1111's page the script looks for: the quicksettings' checkpoint selector (its elem_id).
A1111_PAGE = """<!doctype html><html><head><script src="/supermerger_state.js"></script></head><body>
<div id="quicksettings" style="display:flex"><div id="setting_sd_model_checkpoint">a.safetensors</div></div>
</body></html>"""


@pytest.fixture
def served_indicator(tmp_path, monkeypatch):
    """A page shaped like A1111's top bar, loading the extension's script, and the API; yields (url, session)."""
    import threading

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, Response

    from mergers.api import make_router

    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))
    session = MergeSession(UiHost.create(tmp_path))
    app = FastAPI()
    app.include_router(make_router(session))
    app.get("/")(lambda: HTMLResponse(A1111_PAGE))
    app.get("/supermerger_state.js")(lambda: Response(INDICATOR_JS.read_text(), media_type="text/javascript"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/", session
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_the_indicator_follows_merge_restore_and_a_checkpoint_change(served_indicator):
    url, session = served_indicator
    host = session.host
    original = weights_checksum(host.live_model().tensors())
    with browser_page(url) as page:
        page.goto(url, wait_until="domcontentloaded")
        indicator = page.locator("#supermerger_state")
        indicator.wait_for(state="attached")  # made beside the selector at the first answer of /state
        assert not indicator.is_visible()
        session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
        indicator.get_by_text("a x 0.7 + b x 0.3 (ID 1) is swapped in").wait_for()
        assert page.locator("#setting_sd_model_checkpoint + #supermerger_state").count() == 1  # right beside it
        page.screenshot(path=str(SCREENSHOT.with_name("supermerger-indicator.png")))
        indicator.get_by_role("button", name="Restore").click()
        indicator.wait_for(state="hidden")
        assert weights_checksum(host.live_model().tensors()) == original and not session.state()["merged"]
        session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.6))
        indicator.get_by_text("(ID 2) is swapped in").wait_for()
        host._live = FakeLive.load(host.models_dir / "b.safetensors")  # the web UI loaded another checkpoint
        indicator.wait_for(state="hidden")
