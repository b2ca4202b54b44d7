"""Packaging: pyproject's promises (ranges, the console script, one package) and what the wheel holds.

The wheel is built here without a venv or network (a second or two); installing it into a fresh venv and
running ``supermerger demo`` there is CI's ``make test-wheel`` (``.ci/wheel``), too slow for every run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mergers.ui import assets

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# What pip users get beside the code: every data file, the tab's stylesheet and scripts.
DATA_FILES = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "mergers").rglob("*")
                    if path.is_file() and "data" in path.relative_to(ROOT).parts[:-1])


def test_requirements_are_ranges_and_torch_has_no_upper_bound():
    """pip must never replace a torch (or numpy) a web UI or the user installed: no pins, no torch ceiling."""
    project = PYPROJECT["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["ui"]]:
        assert "==" not in requirement and "~=" not in requirement, requirement
    torch = next(r for r in project["dependencies"] if re.match(r"torch\b", r))
    assert torch == "torch>=2.1"
    assert not any(r.startswith("gradio") for r in project["dependencies"])  # the `ui` extra brings it


def test_the_console_script_is_the_command_line():
    assert PYPROJECT["project"]["scripts"] == {"supermerger": "mergers.cli:main"}
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["mergers", "mergers.*"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel, built from a copy of what an sdist holds (the checkout keeps no build/ folder)."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("mergers", "javascript"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "style.css"):
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    return zipfile.ZipFile(next(out.glob("supermerger-*.whl")))


def test_the_wheel_holds_the_mergers_package_only(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}
    assert tops == {"mergers"}  # not bench/, demo/, tests/, docs/
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "supermerger = mergers.cli:main" in wheel.read(entry_points).decode("utf-8")


def test_the_wheel_holds_every_data_file_and_the_tabs_assets(wheel):
    names = set(wheel.namelist())
    assert DATA_FILES and not set(DATA_FILES) - names
    scripts = sorted(path.name for path in (ROOT / "javascript").glob("*.js"))
    assert {f"mergers/ui/assets/javascript/{name}" for name in scripts} <= names
    assert wheel.read("mergers/ui/assets/style.css") == (ROOT / "style.css").read_bytes()


def test_the_standalone_app_finds_the_assets_in_a_checkout():
    assert assets.asset_dir() in (assets.PACKAGED, ROOT)
    assert assets.stylesheet() == (ROOT / "style.css").read_text(encoding="utf-8")
    assert len(assets.scripts()) == len(list((ROOT / "javascript").glob("*.js")))


def css_selectors(css: str) -> list[str]:
    """Every selector of a stylesheet without at-rules (comments dropped)."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.DOTALL)
    return [selector.strip() for block in re.findall(r"([^{}]+)\{[^{}]*\}", css) for selector in block.split(",")]


def test_every_style_rule_is_scoped_to_the_tab():
    """A1111 and Forge load style.css into every page: a rule outside the tab would change other tabs."""
    selectors = css_selectors((ROOT / "style.css").read_text(encoding="utf-8"))
    assert selectors
    unscoped = [s for s in selectors if not re.match(r'(#supermerger_|\[id\^="supermerger_)', s)]
    assert unscoped == []
