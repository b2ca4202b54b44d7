"""Stand-in for modules/paths.py and paths_internal.py: where A1111 keeps its folders.

A1111 derives them from ``--data-dir`` (default: its install folder); here the
environment variable ``A1111_STUB_DATA_DIR`` plays that flag.
"""

import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = os.environ.get("A1111_STUB_DATA_DIR", script_path)
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
