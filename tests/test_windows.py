"""The command line under a real Windows CPython (torch's Windows build, run by Wine) gives Linux's results.

Runs where ``SUPERMERGER_WINDOWS_PYTHON`` names the folder ``make test-windows`` builds (``.venv-win``);
skipped elsewhere. Paths hold spaces and non-ASCII letters, stdout is a pipe (so Windows encodes it in
its ANSI code page, cp1252), and every output is compared tensor by tensor with the same merge made here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.demo import tiny_state_dict
from mergers.metadata import stored_recipe
from mergers.writer import save_checkpoint
from platforms import ulp_distance

ROOT = Path(__file__).resolve().parents[1]
WINDOWS_PYTHON = os.environ.get("SUPERMERGER_WINDOWS_PYTHON")

pytestmark = pytest.mark.skipif(not WINDOWS_PYTHON, reason="set SUPERMERGER_WINDOWS_PYTHON (make test-windows)")

MERGES = {  # name → CLI options after the inputs
    "weight_sum": ["--alpha", "0.3"],
    "add_difference": ["--mode", "Add difference", "--alpha", "0.7"],
    "triple_sum": ["--mode", "Triple sum", "--alpha", "0.3", "--beta", "0.25"],
    "sum_twice": ["--mode", "sum Twice", "--alpha", "0.4", "--beta", "0.6"],
    "cosineA_GRAD_V": ["--calcmode", "cosineA", "--weights-alpha", "GRAD_V"],
    "block_weights_fp16": ["--weights-alpha", "ALL:0.25, OUT:1, IN03-IN05:0.6", "--dtype", "fp16"],
}
# torch's Windows lerp rounds its vector and scalar paths differently (FMA on one only): a lerp rounded
# to the model's dtype may differ from Linux by 1 ulp at rounding ties; triple sum rounds two nested
# lerps (2 ulp). The other merges must be bit-equal.
LERP_ULPS = {"weight_sum": 1, "triple_sum": 2, "sum_twice": 1, "cosineA_GRAD_V": 1, "block_weights_fp16": 1}


def windows(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the Windows python with ``args``; stdout is a pipe, as a log redirect is on Windows."""
    environment = {**os.environ, "PYTHONPATH": "Z:" + str(ROOT)}
    return subprocess.run(["bash", str(ROOT / ".ci" / "wine"), WINDOWS_PYTHON, *args], cwd=cwd, env=environment,
                          capture_output=True, timeout=timeout, check=False)


def windows_path(path: Path) -> str:
    return "Z:" + str(path).replace("/", "\\")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("win") / "Modèles de test"  # a space and a non-ASCII letter
    folder.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        state = tiny_state_dict("sd1", seed=seed)
        state["cond_stage_model.zero.bias"] = torch.zeros(64, dtype=torch.float16)  # cosine of zeros
        state["first_stage_model.ctrl_z"] = torch.full((300,), 0x1A, dtype=torch.uint8)  # text mode's EOF byte
        save_checkpoint(folder / f"ä {name}.safetensors", state)
    return folder


@pytest.fixture(scope="module")
def windows_outputs(folder) -> dict:
    """Every merge of ``MERGES`` made under Windows in one process, through ``mergers.cli.main``."""
    inputs = [windows_path(folder / f"ä {name}.safetensors") for name in "abc"]
    jobs = {name: ["merge", *inputs, *options, "-o", windows_path(folder / f"win {name}.safetensors")]
            for name, options in MERGES.items()}
    driver = folder.parent / "driver.py"
    driver.write_text(
        "import json, sys\nfrom mergers.cli import main\n"
        f"jobs = json.loads({json.dumps(json.dumps(jobs))})\n"
        "codes = {name: main(argv) for name, argv in jobs.items()}\n"
        "print('codes', json.dumps(codes))\n", encoding="utf-8")
    done = windows(windows_path(driver), cwd=folder)
    stdout = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, stdout + done.stderr.decode("utf-8", "replace")
    codes = json.loads(stdout.rsplit("codes ", 1)[1])
    return {"codes": codes, "stdout": stdout}


def linux_output(folder: Path, name: str) -> Path:
    target = folder / f"linux {name}.safetensors"
    if not target.exists():
        inputs = [str(folder / f"ä {n}.safetensors") for n in "abc"]
        assert main(["merge", *inputs, *MERGES[name], "-o", str(target)]) == 0
    return target


@pytest.mark.parametrize("name", list(MERGES))
def test_windows_merge_equals_linux(folder, windows_outputs, name):
    assert windows_outputs["codes"][name] == 0, windows_outputs["stdout"]
    with open_checkpoint(folder / f"win {name}.safetensors") as win, \
            open_checkpoint(linux_output(folder, name)) as linux:
        assert list(win) == list(linux)
        (win_recipe, win_models), (linux_recipe, linux_models) = stored_recipe(win.metadata), stored_recipe(linux.metadata)
        assert (win_recipe.mode, win_recipe.calcmode) == (linux_recipe.mode, linux_recipe.calcmode)
        assert win_models["model_a"]["sha256"] == linux_models["model_a"]["sha256"]  # hashed the same bytes
        worst = 0
        for key in linux:
            a, b = win[key], linux[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if torch.equal(a, b):
                continue
            assert name in LERP_ULPS and a.is_floating_point(), f"{key} differs in a merge without lerp"
            worst = max(worst, int(ulp_distance(a, b).max()))
        assert worst <= LERP_ULPS.get(name, 0), f"{name}: {worst} ulp"


def test_windows_demo_and_info_print_through_a_cp1252_pipe(folder):
    """``demo`` in an empty folder, then ``info`` on its output: the estimate's "≈" and the formula's "α"
    reach a redirected stdout (cp1252 on Windows) without UnicodeEncodeError."""
    empty = folder.parent / "démo vide"
    empty.mkdir()
    done = windows("-m", "mergers", "demo", cwd=empty)
    text = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, text + done.stderr.decode("utf-8", "replace")
    assert "≈" in text and "wrote" in text
    merged = next((empty / "demo").glob("*merged*.safetensors"))
    info = windows("-m", "mergers", "info", windows_path(merged), cwd=empty)
    text = info.stdout.decode("utf-8", "replace")
    assert info.returncode == 0 and "SD1" in text, text + info.stderr.decode("utf-8", "replace")
    # torch.randn's Windows build differs in the last bit on a few keys, so the demo models themselves
    # differ: merge Windows' demo models here and compare the merges.
    linux = folder.parent / "linux demo"
    shutil.copytree(empty / "demo", linux, ignore=shutil.ignore_patterns("*merged*"))
    assert main(["demo", "--folder", str(linux)]) == 0
    with open_checkpoint(merged) as win, open_checkpoint(next(linux.glob("*merged*.safetensors"))) as ref:
        assert list(win) == list(ref)
        assert all(int(ulp_distance(win[k], ref[k]).max()) <= 1 if win[k].is_floating_point()
                   else torch.equal(win[k], ref[k]) for k in ref)
