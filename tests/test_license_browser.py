"""The License panel in a real headless Chromium: picking models updates it, a warning shows (see test_ui_browser)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

from tests.test_ui_browser import CHROMIUM, browser_page, choose
from tests.test_ui_browser import served as served  # noqa: F401 - a fixture, used by name

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")


def test_the_panel_follows_the_chosen_models_in_the_page(served):
    url, host = served
    (host.models_dir / "b.civitai.info").write_text(json.dumps(
        {"model": {"name": "Bee", "allowDerivatives": False, "allowCommercialUse": ["Image"]},
         "creator": {"username": "bob"}}), encoding="utf-8")
    titles = {entry.path.name: entry.title for entry in host.list_models()}
    with browser_page(url) as page:
        page.goto(url, wait_until="domcontentloaded")
        panel = page.locator("#supermerger_license").first
        panel.get_by_text("Choose the models").wait_for()
        choose(page, "model_a", titles["a.safetensors"])
        choose(page, "model_b", titles["c.safetensors"])
        panel.get_by_text("model_b c.safetensors").wait_for()
        assert "allows no derivatives" not in panel.inner_text()
        choose(page, "model_b", titles["b.safetensors"])
        panel.get_by_text("b.safetensors allows no derivatives: this merge should not be shared").wait_for()
        assert "from: b.civitai.info" in panel.inner_text()
