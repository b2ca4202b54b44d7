"""Stand-in for A1111's launch.py as an extension's install.py sees it.

A1111 runs ``install.py`` in a subprocess with its own folder on PYTHONPATH, so
``import launch`` gives ``launch_utils``' helpers. ``run_pip`` here only records.
"""

import importlib.metadata
import importlib.util

pip_calls = []  # not in A1111: (command, desc) of every run_pip


def is_installed(package):
    """True when a distribution (``Pillow``) or an importable module (``PIL``) of that name exists."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=False):
    """A1111 runs ``"{python}" -m pip {command} --prefer-binary`` through the shell."""
    pip_calls.append((command, desc))
    return ""
