"""``python -m mergers selftest``: the table, the limits it applies, and the exit code on a failure."""

from __future__ import annotations

import pytest
import torch

from mergers import selftest
from mergers.cli import main
from mergers.selftest import Check, compare, run_check


def test_quick_selftest_on_the_cpu_passes_and_prints_a_row_per_check(capsys):
    assert main(["selftest", "--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("pass", "FAIL"))]
    names = " ".join(rows)
    for expected in ("Weight sum / normal", "Weight sum / cosineA", "Add difference / smoothAdd", "TIES / normal",
                     "DARE / normal", "block weights GRAD_V", "elemental", "dice (seeded)",
                     "swap into the model on the device", "restore after the swap", "LoRA extract (SVD), applied"):
        assert expected in names, expected
    assert all(row.startswith("pass") for row in rows)
    assert out.rstrip().endswith(f"{len(rows)} passed, 0 failed")


def _pair(delta_ulps: int, dtype=torch.float16):
    reference = torch.linspace(-2, 2, 64).to(dtype)
    shifted = (reference.view(torch.int16) + delta_ulps * torch.sign(reference).to(torch.int16)).view(dtype)
    return {"k": reference}, {"k": shifted}


@pytest.mark.parametrize("limit, ulps, passes", [("ulp", 0, True), ("ulp", 1, True), ("ulp", 2, False),
                                                 ("exact", 1, False), ("reduction", 1, True)])
def test_limits_in_ulps(limit, ulps, passes):
    reference, result = _pair(ulps)
    text, passed = compare(reference, result, limit)
    assert passed is passes, text
    assert ("bit-equal" in text) == (ulps == 0)


def test_relative_limits_for_reductions_and_svd():
    reference = {"k": torch.ones(8)}
    assert compare(reference, {"k": torch.ones(8) * (1 + 5e-4)}, "reduction")[1]
    assert not compare(reference, {"k": torch.ones(8) * 1.01}, "reduction")[1]
    assert compare(reference, {"k": torch.ones(8) * 1.01}, "svd")[1]
    assert not compare(reference, {"k": torch.ones(8) * 1.1}, "svd")[1]
    assert not compare(reference, {"other": torch.ones(8)}, "ulp")[1]  # keys differ
    assert not compare(reference, {"k": torch.ones(8, dtype=torch.float16)}, "ulp")[1]  # dtype differs


def test_a_device_that_computes_differently_fails_its_row():
    check = Check("fake", lambda device: {"k": torch.zeros(4) if device == "cpu" else torch.ones(4)}, "ulp")
    row = run_check(check, "meta")
    assert not row.passed and "1 keys differ" in row.difference
    broken = run_check(Check("raises", lambda device: 1 / 0, "ulp"), "cpu")
    assert not broken.passed and "ZeroDivisionError" in broken.difference


def test_a_failure_makes_the_command_exit_1(monkeypatch, capsys):
    real = selftest.compare
    monkeypatch.setattr(selftest, "compare", lambda ref, res, limit: ("forced", False) if limit == "exact"
                        else real(ref, res, limit))
    assert main(["selftest", "--device", "cpu", "--quick"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["selftest", "--device", "cuda", "--quick"]) == 2
    assert "not available" in capsys.readouterr().err


def test_the_module_runs_on_a_bare_gpu_box():
    """``python -m mergers.selftest`` imports none of the UI's packages (a lent GPU machine has torch,
    safetensors, numpy and tqdm only)."""
    import subprocess
    import sys

    code = ("import sys, mergers.selftest, bench.gpu; "
            "print(sorted({'PIL', 'gradio', 'fastapi', 'psutil', 'scipy'} & {m.split('.')[0] for m in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=selftest.__file__.rsplit("mergers", 1)[0])
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
