"""Run a script under A1111's Gradio line (3.41.2 with pydantic 1), in the venv ``make test`` builds.

Gradio 3.41 only warns about arguments it does not know, so the scripts fail on warnings themselves.

Example:
    >>> assert run_under_gradio3(BUILD, models, data, folder=tmp_path).endswith("gradio 3.41.2 ok")
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRADIO3_PYTHON = Path(os.environ.get("SUPERMERGER_GRADIO3_PYTHON") or ROOT / ".venv-g3" / "bin" / "python")


def run_under_gradio3(code: str, *args, folder: Path, env: Optional[dict] = None, timeout: int = 180) -> str:
    """Run ``code`` with ``args`` under Gradio 3.41.2 (skipped when its venv is missing); its stdout."""
    if not GRADIO3_PYTHON.exists() or os.name == "nt":  # (under Wine it is the Linux venv's python)
        pytest.skip(f"{GRADIO3_PYTHON} missing: build the Gradio 3.41.2 venv (make test does)")
    script = folder / "under_gradio3.py"
    script.write_text(code)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    result = subprocess.run([str(GRADIO3_PYTHON), str(script), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=environment, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()
