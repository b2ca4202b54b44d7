"""The standalone page in a real headless Chromium: pick models, press Merge, read the message.

Needs Debian's Chromium (``apt-get install -y chromium``) and Playwright from pip
(``pip install playwright``; its own browser download is not used). Skipped when
either is missing. Screenshots are left in the system temp folder as
``supermerger-tab.png`` and ``supermerger-history.png`` for a person to look at.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

from mergers.session import MergeSession
from mergers.ui.app import launch
from tests.ui_host import UiHost, weights_checksum

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(tempfile.gettempdir()) / "supermerger-tab.png"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")


def free_port() -> int:
    """A port nothing listens on now, on the loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The page served on the loopback from a thread of this process; yields (url, host)."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    host = UiHost.create(tmp_path)
    port = free_port()
    try:
        app = launch(MergeSession(host), port=port, prevent_thread_lock=True, quiet=True)
    except ValueError as error:  # Gradio's "localhost is not accessible": its own page failed to render
        pytest.fail(f"Gradio could not serve the page ({error}); Gradio 4.44 needs starlette<1, "
                    "Gradio 3.41 needs fastapi==0.94.0 (see the server's traceback above)")
    try:
        yield f"http://127.0.0.1:{port}/", host
    finally:
        app.close()


@pytest.fixture
def page(served):
    """A Chromium page that may reach the served page only (web fonts and the like are refused)."""
    url, _ = served
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


def choose(page, field: str, option: str) -> None:
    """Pick ``option`` in the model dropdown ``field`` (Gradio 3.41 and 4 mark options alike)."""
    block = page.locator(f"#supermerger_{field}").first
    block.get_by_role("combobox").or_(block.locator("input")).first.click()
    block.locator(f'[data-testid="dropdown-option"][aria-label="{option}"]').click()


def test_merge_from_the_page(page, served):
    url, host = served
    before = weights_checksum(host.live_model().tensors())
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_label("Model A", exact=True).wait_for()
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
