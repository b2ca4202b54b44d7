"""The README stays a newcomer's page and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_LIMIT_BYTES = 10_000  # one screen or two; the reference lives in docs/
IMAGE_LIMIT_BYTES = 200_000


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces as hyphens)."""
    headings = re.findall(r"(?m)^#+ (.+)$", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}


def test_the_readme_is_short_and_starts_with_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) < README_LIMIT_BYTES
    assert re.search(r"```sh\nmake demo .*\nmake test ", readme)


def test_every_relative_link_leads_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert broken == []


def test_every_docs_page_is_in_the_index_and_the_images_are_small():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES[1:] if p.name != "index.md" and f"({p.name})" not in index] == []
    for image in (ROOT / "docs" / "images").glob("*"):
        assert image.stat().st_size < IMAGE_LIMIT_BYTES, image
