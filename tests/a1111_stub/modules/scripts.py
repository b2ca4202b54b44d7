"""Stand-in for modules/scripts.py: script discovery and loading, ``basedir()``, ``Script``."""

import logging
import os
import sys
from collections import namedtuple

from modules import paths, script_loading

log = logging.getLogger(__name__)

AlwaysVisible = object()
ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])

current_basedir = paths.script_path
scripts_data = []


class Script:
    """Base of A1111's txt2img/img2img scripts (only what extensions commonly override)."""

    filename = None
    args_from = None
    args_to = None

    def title(self):
        raise NotImplementedError()

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []


def basedir():
    """The folder of the extension whose script is loading; only meaningful while it loads.

    After loading it is A1111's own folder again, so extensions must call it at import time.
    """
    return current_basedir


def list_scripts(scriptdirname, extension):
    """Every ``<extension>/scripts/*.py`` of the installed extensions, sorted like A1111."""
    found = []
    extensions_dir = paths.extensions_dir
    if not os.path.isdir(extensions_dir):
        return found
    for name in sorted(os.listdir(extensions_dir)):
        base = os.path.join(extensions_dir, name)
        folder = os.path.join(base, scriptdirname)
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            if os.path.splitext(filename)[1].lower() == extension:
                found.append(ScriptFile(base, filename, os.path.join(folder, filename)))
    return found


def load_scripts():
    """Import every extension script with its folder first on ``sys.path`` only while it loads."""
    global current_basedir
    scripts_data.clear()
    syspath = sys.path
    for scriptfile in list_scripts("scripts", ".py"):
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            module = script_loading.load_module(scriptfile.path)
            scripts_data.append((scriptfile, module))
        except Exception:
            log.exception("Error loading script: %s", scriptfile.filename)
        finally:
            sys.path = syspath
            current_basedir = paths.script_path
