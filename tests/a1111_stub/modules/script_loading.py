"""Stand-in for modules/script_loading.py: how A1111 imports a script file."""

import importlib.util
import os

loaded_scripts = {}


def load_module(path):
    """Import ``path`` as a module named after its file name (``supermerger.py``), as A1111 does."""
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module
