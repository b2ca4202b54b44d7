"""Stand-in for modules/infotext_utils.py (generation_parameters_copypaste before v1.8)."""

import json


def quote(text):
    """Values with a comma, colon or new line are written as JSON strings in the infotext."""
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)
