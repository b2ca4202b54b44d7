"""Which OS the tests run on, and marks for tests that need what one OS lacks.

CI also runs the I/O, merge, CLI, history and swap tests under a Windows CPython (Wine, see
``.ci/windows``); tests that need POSIX-only facilities are marked here rather than weakened.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mergers.selftest import same_bits, ulp_distance

WINDOWS = os.name == "nt"


def _under_wine() -> bool:
    if not WINDOWS:
        return False
    import ctypes

    try:
        return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")
    except OSError:
        return False


UNDER_WINE = _under_wine()

# (Wine maps "/proc" to the Linux one, which knows nothing of Windows' mappings: Windows is excluded by name.)
needs_proc = pytest.mark.skipif(WINDOWS or not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
needs_rlimit = pytest.mark.skipif(WINDOWS, reason="uses resource.setrlimit to fake a full disk (POSIX)")
needs_real_symlinks = pytest.mark.skipif(UNDER_WINE, reason="Wine's os.symlink reports success but makes nothing")
# The A1111 stand-in installs the extension as links to this checkout, so the glue's "our own mergers
# package" check holds; Windows needs developer mode for symlinks, and Wine makes neither those nor junctions.
needs_extension_link = pytest.mark.skipif(WINDOWS, reason="the stand-in links the extension to this checkout")
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")


def assert_lerp_equal(actual: torch.Tensor, expected: torch.Tensor, message: str = "") -> None:
    """Bit-equal, except on Windows, where torch's lerp uses FMA on its vector path and not on its scalar
    path (tails, small tensors, a stretch's end): there results rounded to the model's dtype may differ
    by 1 ulp at rounding ties, never more."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, message
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), message
        return
    if not WINDOWS:
        assert same_bits(actual, expected), message
        return
    assert actual.numel() == 0 or int(ulp_distance(actual, expected).max()) <= 1, message
