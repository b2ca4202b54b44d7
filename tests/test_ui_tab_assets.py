"""The tab's style.css and javascript/ in a real headless Chromium, under Gradio 4 (this venv) and Gradio 3.41
(A1111's line, the venv ``make test`` builds), in a page shaped like A1111's and in the standalone app.

A1111's page gets the files as A1111 v1.10 puts them in (``tests/serve_tab.py``); the standalone app loads
them itself. Both pages are served by one process per Gradio (``python -m tests.serve_tab``), so Gradio 3.41
serves from its venv while Chromium is driven from here. Checked: a computed style from style.css (and none on
A1111's other tab), hover hints, Ctrl+Enter merging, the copy buttons, the sliders' values on the weights
box, and, in the standalone app, the hidden preview controls. Screenshots go to ``$SUPERMERGER_ARTEFACTS``
(default: the system temp folder) as ``supermerger-<host>-gradio<N>.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

from tests.gradio3 import GRADIO3_PYTHON
from tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, free_port

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = Path(os.environ.get("SUPERMERGER_ARTEFACTS") or tempfile.gettempdir())
HINTS_JS = ROOT / "javascript" / "supermerger_hints.js"
START_TIMEOUT_S = 120  # importing Gradio and torch on a busy 2-core machine
GRADIOS = {"4": Path(sys.executable), "3": GRADIO3_PYTHON}

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")


def hints() -> dict:
    """javascript/supermerger_hints.js's table (its object is plain JSON)."""
    text = HINTS_JS.read_text(encoding="utf-8").rsplit("window.supermergerHints =", 1)[1]
    return json.loads(text[:text.rindex("}") + 1])


@pytest.fixture(scope="module", params=["4", "3"], ids=["gradio4", "gradio3"])
def served(request, tmp_path_factory):
    """``tests/serve_tab.py`` under Gradio 4 or 3.41, in its own process; yields (Gradio major, base URL).
    A1111's page is at the base URL, the standalone app under ``standalone/``."""
    gradio, python = request.param, GRADIOS[request.param]
    if not python.exists() or os.name == "nt":
        pytest.skip(f"{python} missing: build the Gradio 3.41.2 venv (make test does)")
    folder = tmp_path_factory.mktemp(f"gradio{gradio}")
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
                   "SUPERMERGER_CACHE": str(folder / "cache")}
    log = open(folder / "server.log", "w+", encoding="utf-8")  # noqa: SIM115 - read back on failure
    server = subprocess.Popen([str(python), "-m", "tests.serve_tab", str(folder), str(free_port())],
                              stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=environment)
    try:
        line = _first_line(server)
        if not line.startswith("serving "):
            log.seek(0)
            pytest.fail(f"the pages did not start under Gradio {gradio}: {line!r}\n{log.read()[-3000:]}")
        yield gradio, line.split()[-1]
    finally:
        server.kill()
        server.wait(timeout=30)
        log.close()


def _first_line(server: subprocess.Popen) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(server.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    return lines[0].strip() if lines else ""


@contextlib.contextmanager
def chromium(allowed: str, url: str):
    """A page at ``url`` that may reach what starts with ``allowed`` only, and may use the clipboard."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                          permissions=["clipboard-read", "clipboard-write"])
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(allowed)
                       else route.abort())
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            browser.close()


def open_tab(page, host: str) -> None:
    if host == "a1111":  # A1111 opens on txt2img; Gradio 3.41's tabs are plain buttons
        tab = page.get_by_role("tab", name="SuperMerger").or_(page.get_by_role("button", name="SuperMerger",
                                                                               exact=True))
        tab.first.click()
    page.locator("#supermerger_merge").first.wait_for()


def sub_tab(page, name: str) -> None:
    """Open the tab's sub-tab ``name`` (Gradio 4 marks tabs as such; Gradio 3.41's are plain buttons)."""
    tabs = page.locator("#supermerger_tabs")
    tabs.get_by_role("tab", name=name).or_(tabs.get_by_role("button", name=name, exact=True)).first.click()


def choose(page, text: str, option_index: int) -> None:
    """Pick the ``option_index``-th model in the model dropdown labelled ``text``."""
    block_labelled(page, text).locator("input").first.click()
    page.locator('[data-testid="dropdown-option"]').nth(option_index).click()


def computed(page, selector: str, prop: str) -> str:
    return page.locator(selector).first.evaluate(f"(el) => getComputedStyle(el).getPropertyValue({prop!r})")


def label(page, text: str):
    """The visible label span of the tab's control ``text``."""
    return page.locator(f'#supermerger_tabs span[data-testid="block-info"]:text-is("{text}")').filter(visible=True).first


def block_labelled(page, text: str):
    """The tab's shown control labelled ``text`` (its innermost .block: an accordion holding it is one too)."""
    return page.locator("#supermerger_tabs .block").filter(
        has=page.locator(f'span[data-testid="block-info"]:text-is("{text}")')).filter(visible=True).last


def clipboard(page) -> str:
    return page.evaluate("() => navigator.clipboard.readText()")


def test_in_a1111s_page_style_hints_keys_and_copy_work(served):
    table = hints()["labels"]
    gradio, url = served
    with chromium(url, url) as page:
        prompt_label = page.locator('#txt2img_prompt span[data-testid="block-info"]').first
        prompt_label.wait_for()
        open_tab(page, "a1111")
        # style.css: the block sliders' labels are monospace, IN and OUT sit side by side; A1111's tab is as it was.
        assert "monospace" in computed(page, "#supermerger_sliders_in span[data-testid='block-info']", "font-family")
        assert "monospace" not in computed(page, "#txt2img_prompt span[data-testid='block-info']", "font-family")
        boxes = [page.locator(f"#supermerger_sliders_{side}").first.bounding_box() for side in ("in", "mid", "out")]
        assert boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"] and abs(boxes[0]["y"] - boxes[2]["y"]) < 2
        assert page.locator("#supermerger_merge").first.bounding_box()["height"] <= 48
        # javascript/: hints on the tab's controls (a button, a slider's block, a block slider by pattern) only.
        merge = page.locator("#supermerger_merge").first
        page.wait_for_function("(el) => el.title !== ''", arg=merge.element_handle())
        assert merge.get_attribute("title") == table["Merge"]
        assert label(page, "alpha").get_attribute("title") == table["alpha"]
        assert label(page, "IN04").get_attribute("title") == "Input block 04 of the U-Net"
        assert not page.locator("#txt2img_generate").first.get_attribute("title")
        page.screenshot(path=str(ARTEFACTS / f"supermerger-a1111-gradio{gradio}.png"), full_page=True)

        # The sliders' values in the readable form, when hovering the weights box.
        alpha_box = block_labelled(page, "weights for alpha")
        alpha_box.hover()
        assert "The sliders now: IN00:0.5, IN01:0.5" in alpha_box.get_attribute("title")
        assert "BASE:0.5, M00:0.5, OUT11:0.5" in alpha_box.get_attribute("title")
        alpha_box.locator(".supermerger-copy").click()
        assert clipboard(page) == alpha_box.locator("textarea").input_value()

        # Ctrl+Enter with a model loaded and a generator: Merge and Gen.
        choose(page, "Model A", 0)
        choose(page, "Model B", 1)
        page.locator("#supermerger_tabs textarea").first.focus()
        page.keyboard.press("Control+Enter")
        message = page.locator("#supermerger_message").first
        message.get_by_text("keys merged").wait_for()
        page.wait_for_function("() => [...document.querySelectorAll('#supermerger_tabs textarea')]"
                               ".some((box) => box.value.includes('checksum'))")  # the preview was made

        # The History tab's recipe, copied.
        sub_tab(page, "History")
        page.get_by_role("button", name="Show recipe", exact=True).click()
        recipe_box = block_labelled(page, "Recipe (JSON)")
        page.wait_for_function("(el) => el.value.includes('model_a')", arg=recipe_box.locator("textarea").element_handle())
        recipe_box.locator(".supermerger-copy").click()
        assert json.loads(clipboard(page))["model_a"].startswith("a.safetensors")


def test_the_standalone_app_hides_what_needs_the_web_ui_and_merges_on_ctrl_enter(served):
    gradio, url = served
    with chromium(url, url + "standalone/") as page:
        open_tab(page, "standalone")
        assert "/ext/" not in page.content()  # nothing A1111-like put the assets in: the app loaded its own
        assert "monospace" in computed(page, "#supermerger_sliders_in span[data-testid='block-info']", "font-family")
        merge = page.locator("#supermerger_merge").first
        page.wait_for_function("(el) => el.title !== ''", arg=merge.element_handle())
        assert merge.get_attribute("title") == hints()["labels"]["Merge"]
        for hidden in ("#supermerger_merge_and_gen", "#supermerger_gen", "#supermerger_restore",
                       "#supermerger_generation"):
            assert not page.locator(hidden).first.is_visible(), hidden
        assert not page.get_by_text("Generation Parameters", exact=True).is_visible()
        notes = page.get_by_text(re.compile("Previews, Merge and Gen and Restore need the web UI"))
        assert notes.count() == 1 and notes.first.is_visible()
        page.screenshot(path=str(ARTEFACTS / f"supermerger-standalone-gradio{gradio}.png"), full_page=True)
        choose(page, "Model A", 0)
        choose(page, "Model B", 1)
        page.keyboard.press("Control+Enter")  # no generator here: Merge
        message = page.locator("#supermerger_message").first
        message.get_by_text("keys merged").wait_for()
        assert "no model loaded: Save writes it" in message.inner_text()
        # The Analysis tab's Compare and Stop sit beside a tall column: a normal height all the same.
        sub_tab(page, "Analysis")
        for name in ("Compare", "Stop"):
            button = page.locator("#supermerger_tabs button").filter(visible=True).get_by_text(name, exact=True)
            assert button.first.bounding_box()["height"] <= 48, name


def test_the_hints_cover_every_control_of_the_merge_and_history_tabs():
    """Every declared field, button and named control of the Merge and History tabs has a hint."""
    pytest.importorskip("gradio")
    from mergers.ui.fields import FIELDS, GENERATION_FIELDS
    from mergers.ui.sections import BUTTONS

    table = hints()["labels"]
    labels = {f.label for f in (*FIELDS, *GENERATION_FIELDS)} | {label for _, label, _ in BUTTONS}
    labels |= {"Select preset", "Set alpha", "Read alpha", "Set beta", "Read beta", "Save", "Refresh",
               "File name (empty: the merge's name)", "overwrite", "write NaN/Inf", "Images", "Infotext",
               "Search (words separated by spaces)", "match", "Reload", "Load settings from ID (-1: the last)",
               "Load settings", "Show recipe", "Recipe (JSON)"}
    assert sorted(labels - set(table)) == []
