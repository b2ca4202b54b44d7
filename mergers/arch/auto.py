"""The automatic block layout of a model no layout file describes, read from its key names alone.

Repeated numbered groups (``blocks.N.``, ``layers.N.``, ``double_blocks.N.``…) become blocks in order;
every other diffusion key is ``IN``, or ``OUT`` when its name says it comes last (``final_layer``,
``norm_out``, ``proj_out``, ``head``…); text encoders are ``TE`` and a VAE ``VAE`` when the file has them.
The layout's name spells out the groups (``auto:TE;double_blocks=19;single_blocks=38``), so a recipe
that records it reads back to the same blocks without the file.

Example:
    >>> shapes = {f"blocks.{n}.{p}.weight": (4, 4) for n in range(3) for p in ("q", "k", "v")}
    >>> shapes |= {"patch_embed.weight": (4, 4), "final_layer.weight": (4, 4)}
    >>> layout = auto_layout_from_name(auto_layout_name(shapes))
    >>> layout.blocks, layout.block_of("blocks.2.q.weight"), layout.block_of("final_layer.weight")
    (('IN', 'B00', 'B01', 'B02', 'OUT'), 'B02', 'OUT')
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from mergers.arch.spec import BlockRule, Layout, LayoutFileError

AUTO_PREFIX = "auto:"
TEXT_ENCODER = re.compile(r"^(text_encoders|conditioner|cond_stage_model|text_encoder[_0-9]*|te[0-9]?|clip_[lg]|t5xxl)\.")
VAE = re.compile(r"^(vae|first_stage_model)\.")
# Names of the modules that run after the repeated blocks (DiT final layers, U-Net out, Wan's head).
OUTPUT_NAME = re.compile(r"(^|\.)(final\w*|norm_out|proj_out|out|output\w*|head|clf|norm_final)(\.|$)")
# A group's position among groups: encoder-side words first, decoder-side words last, others between.
EARLY_WORDS = ("refiner", "down", "input", "double", "joint", "encoder", "context")
LATE_WORDS = ("single", "up", "output", "decoder")
GENERIC_WORDS = {"blocks", "block", "layers", "layer"}
RESERVED_LETTERS = {"IN", "OUT", "TE", "VAE", "BASE", "ALL", "M", "MID"}
MIN_KEYS_PER_BLOCK = 3  # a transformer block has a dozen or more; Sequential pairs (mlp.0, mlp.2) have 1-2
SAMPLE_PREFIXES = 3


def auto_layout_name(shapes: Mapping[str, Sequence[int]]) -> str:
    """The ``auto:…`` layout name of a model's keys: its numbered groups with their counts, TE/VAE if present.

    Example:
        >>> auto_layout_name({f"layers.{n}.w.weight": (2,) for n in range(2)} | {f"layers.{n}.{x}": (2,) for n in range(2) for x in "ab"})
        'auto:layers=2'
    """
    keys = list(shapes)
    parts = [part for part, pattern in (("TE", TEXT_ENCODER), ("VAE", VAE)) if any(pattern.match(k) for k in keys)]
    groups = _numbered_groups([k for k in keys if not (TEXT_ENCODER.match(k) or VAE.match(k))])
    return AUTO_PREFIX + ";".join(parts + [f"{path}={count}" for path, count in groups])


@functools.cache
def auto_layout_from_name(name: str) -> Layout:
    """The :class:`Layout` an ``auto:…`` name describes (see :func:`auto_layout_name`).

    Example:
        >>> auto_layout_from_name("auto:TE;double_blocks=2;single_blocks=1").blocks
        ('TE', 'IN', 'D00', 'D01', 'S00', 'OUT')
    """
    tokens = [token for token in name[len(AUTO_PREFIX):].split(";") if token]
    groups = [_parse_group(token, name) for token in tokens if "=" in token]
    flags = {token for token in tokens if "=" not in token}
    if not flags <= {"TE", "VAE"}:
        raise LayoutFileError(f"automatic layout {name!r}: unknown part(s) {', '.join(sorted(flags - {'TE', 'VAE'}))}")
    letters = _group_letters([path for path, _ in groups])
    rules, blocks = _special_rules(flags), []
    for (path, count), letter in zip(groups, letters):
        width = max(2, len(str(count - 1)))
        rules.append(BlockRule(re.compile(rf"^{re.escape(path)}\.(?P<n>\d+)\."), f"{letter}{{n:0{width}d}}"))
        blocks += [f"{letter}{n:0{width}d}" for n in range(count)]
    rules.append(BlockRule(OUTPUT_NAME, "OUT"))
    ids = (("TE",) if "TE" in flags else ()) + ("IN", *blocks, "OUT") + (("VAE",) if "VAE" in flags else ())
    return Layout(name, "automatic", ids, tuple(rules), default="IN", source="automatic")


def key_summary(keys: Sequence[str]) -> str:
    """"N keys, prefix P" for the label of an unknown model: the common prefix, else the commonest first names.

    Example:
        >>> key_summary(["model.diffusion_model.a.weight", "model.diffusion_model.b.weight"])
        '2 keys, prefix model.diffusion_model.'
    """
    count = f"{len(keys)} key{'' if len(keys) == 1 else 's'}"
    common = _common_prefix(keys)
    if common:
        return f"{count}, prefix {common}"
    firsts = Counter(key.split(".")[0] + "." for key in keys).most_common(SAMPLE_PREFIXES + 1)
    shown = ", ".join(name for name, _ in firsts[:SAMPLE_PREFIXES]) + (", …" if len(firsts) > SAMPLE_PREFIXES else "")
    return f"{count}, prefix {shown}"


def key_fingerprint(shapes: Mapping[str, Sequence[int]]) -> str:
    """A short hash of every key name with its shape: equal files agree, a renamed or reshaped key changes it.

    Example:
        >>> key_fingerprint({"a.weight": (2, 2)}) == key_fingerprint({"a.weight": [2, 2]})
        True
    """
    lines = sorted(f"{key}:{','.join(str(int(n)) for n in shape)}" for key, shape in shapes.items())
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def _numbered_groups(keys: Sequence[str]) -> list[tuple[str, int]]:
    """(path, count) of each repeated group (numbers 0…N-1, N ≥ 2, a few keys each), in model order."""
    numbers: dict[str, set[int]] = {}
    key_counts: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for position, key in enumerate(keys):
        found = _first_numbered_segment(key)
        if found:
            path, number = found
            numbers.setdefault(path, set()).add(number)
            key_counts[path] += 1
            first_seen.setdefault(path, position)
    groups = [path for path, found in numbers.items()
              if len(found) >= 2 and found == set(range(len(found))) and key_counts[path] >= MIN_KEYS_PER_BLOCK * len(found)]
    groups.sort(key=lambda path: (_rank(path), first_seen[path]))
    return [(path, len(numbers[path])) for path in groups]


def _first_numbered_segment(key: str) -> tuple[str, int] | None:
    parts = key.split(".")
    for index in range(1, len(parts) - 1):  # a number needs a name before it and a parameter after it
        if parts[index].isdigit():
            return ".".join(parts[:index]), int(parts[index])
    return None


def _rank(path: str) -> int:
    name = path.split(".")[-1]
    if any(word in name for word in EARLY_WORDS):
        return 0
    return 2 if any(word in name for word in LATE_WORDS) else 1


def _group_letters(paths: Sequence[str]) -> list[str]:
    """Initials of each group's name without "blocks"/"layers" ("double_blocks" → D, "noise_refiner" → NR)."""
    letters: list[str] = []
    for path in paths:
        words = [w for w in re.split(r"[_\W]+", path.split(".")[-1]) if w]
        kept = [w for w in words if w.lower() not in GENERIC_WORDS] or words or ["B"]
        letter = "".join(w[0] for w in kept).upper()
        letter = re.sub(r"[^A-Z]", "", letter) or "B"
        while letter in letters or letter in RESERVED_LETTERS:
            letter += "X"
        letters.append(letter)
    return letters


def _parse_group(token: str, name: str) -> tuple[str, int]:
    path, _, count = token.rpartition("=")
    if not path or not count.isdigit() or int(count) < 1:
        raise LayoutFileError(f"automatic layout {name!r}: {token!r} is not GROUP=COUNT")
    return path, int(count)


def _special_rules(flags: set[str]) -> list[BlockRule]:
    rules = [BlockRule(VAE, "VAE" if "VAE" in flags else None)]
    if "TE" in flags:
        rules.append(BlockRule(TEXT_ENCODER, "TE"))
    return rules


def _common_prefix(keys: Sequence[str]) -> str:
    if not keys:
        return ""
    first, last = min(keys).split("."), max(keys).split(".")  # the sorted extremes bound every shared prefix
    size = next((n for n, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    size = min(size, len(first) - 1)  # a prefix, not a whole key
    return ".".join(first[:size]) + "." if size else ""
