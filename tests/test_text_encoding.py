"""Every text file the product reads or writes names its encoding.

Without ``encoding=``, Python decodes and encodes text in the locale's code page: cp1252 on most
Windows machines, where a recipe, preset or history line with "α" or a Japanese model name breaks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [*sorted((ROOT / "mergers").rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py")), ROOT / "install.py"]
TEXT_CALLS = {"read_text", "write_text", "open", "fdopen", "NamedTemporaryFile", "TemporaryFile"}
NOT_FILES = {"Image", "os", "webbrowser"}  # Image.open, os.open (bytes), webbrowser.open


# ``x.open()`` is a file only when ``x`` looks like one (a path, a file): other objects have open() methods too.
FILE_LIKE = re.compile(r"path|Path\(|file", re.IGNORECASE)


def _mode(call: ast.Call) -> str | None:
    """The mode a call opens with, when written as a literal ('r' when left out)."""
    for keyword in call.keywords:
        if keyword.arg == "mode":
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else None
    positional = 0 if isinstance(call.func, ast.Attribute) and call.func.attr == "open" and not _is_builtin_open(call) \
        else 1
    if len(call.args) > positional and isinstance(call.args[positional], ast.Constant):
        return call.args[positional].value
    return "r" if len(call.args) <= positional else None


def _is_builtin_open(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Name) or (isinstance(call.func, ast.Attribute)
                                               and getattr(call.func.value, "id", None) in ("io", "os"))


def text_calls_without_encoding(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        owner = getattr(getattr(node.func, "value", None), "id", None)
        if name not in TEXT_CALLS or owner in NOT_FILES or any(k.arg == "encoding" for k in node.keywords):
            continue
        if name in ("read_text", "write_text"):
            found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
            continue
        if name == "open" and isinstance(node.func, ast.Attribute) and owner not in ("io",) \
                and not FILE_LIKE.search(ast.unparse(node.func.value)):
            continue
        mode = _mode(node)
        if isinstance(mode, str) and "b" not in mode:
            found.append(f"{path.relative_to(root)}:{node.lineno} {name}({mode!r})")
    return found


def test_every_text_file_names_its_encoding():
    offenders = [hit for path in PRODUCT for hit in text_calls_without_encoding(path)]
    assert offenders == []


def test_the_check_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from pathlib import Path\nPath('a').read_text()\nopen('b')\nopen('c', 'rb')\n"
                      "open('d', 'w', encoding='utf-8')\nPath('e').open('a')\nImage.open('f')\nlayer.open()\n",
                      encoding="utf-8")
    hits = text_calls_without_encoding(sample, root=tmp_path)
    assert [hit.split(":")[1] for hit in hits] == ["2 read_text", "3 open('r')", "6 open('a')"]
