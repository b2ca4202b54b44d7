"""Build hook: the wheel carries the tab's ``style.css`` and ``javascript/`` for the standalone app.

A1111 and Forge load both from the extension's top level, so that is where they live in git (one copy);
the build copies them into ``mergers/ui/assets/``. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ASSETS = (("style.css", "style.css"), ("javascript", "javascript"))  # top-level path → path under assets/


class BuildWithAssets(build_py):
    """build_py, plus the top-level style.css and javascript/*.js copied into mergers/ui/assets/."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "mergers" / "ui" / "assets"
        for source, name in ASSETS:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, target / name, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / name)


setup(cmdclass={"build_py": BuildWithAssets})
