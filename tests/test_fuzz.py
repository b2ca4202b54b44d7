"""Fuzzing the readers and parsers of untrusted input: our own errors only, never a crash."""

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergers.adjust import parse_adjust
from mergers.checkpoint import open_checkpoint
from mergers.elemental import parse_elemental
from mergers.errors import MergeError
from mergers.keyfilter import parse_key_filter
from mergers.recipe import Recipe
from mergers.weights import parse_weights

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text made of the characters these syntaxes use, so the fuzzer reaches deep into them.
SYNTAX = st.text(alphabet="0123456789.,:- \nRUXNOTINMDBASEOUTALL*efa", max_size=80)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _only_our_errors(call) -> None:
    try:
        call()
    except MergeError:
        pass


@FAST
@given(header=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=4), tail=st.binary(max_size=64))
def test_safetensors_header_reader(tmp_path_factory, header, tail):
    body = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + tail)
    _only_our_errors(lambda: [t.sum() for t in open_checkpoint(path).values()])


@FAST
@given(entries=st.dictionaries(st.text(max_size=6), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F16", "F32", "BF16", "I64", "BOOL", "F8_E4M3", "X1"]),
    "shape": st.lists(st.integers(-2, 5), max_size=3),
    "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3),
}), max_size=4), size=st.integers(0, 96))
def test_safetensors_offsets_and_shapes(tmp_path_factory, entries, size):
    body = json.dumps(entries).encode()
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(size))
    _only_our_errors(lambda: [t.sum() for t in open_checkpoint(path).values()])


@FAST
@given(raw=st.binary(max_size=200))
def test_random_bytes_as_a_checkpoint(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("x.safetensors", "x.ckpt"):
        (folder / name).write_bytes(raw)
        _only_our_errors(lambda: list(open_checkpoint(folder / name).values()))


@FAST
@given(text=SYNTAX, layout=st.sampled_from(["sd1", "sdxl"]))
def test_weight_strings(text, layout):
    _only_our_errors(lambda: parse_weights(text, layout))


@FAST
@given(text=SYNTAX, layout=st.sampled_from(["sd1", "sdxl"]), extended=st.booleans())
def test_elemental_text(text, layout, extended):
    _only_our_errors(lambda: parse_elemental(text, "sdxl" if extended else layout, extended=extended))


@FAST
@given(text=SYNTAX)
def test_adjust_and_include_exclude(text):
    _only_our_errors(lambda: parse_adjust(text))
    _only_our_errors(lambda: parse_key_filter("exclude", text, text, layout="sd1"))


@FAST
@given(data=st.dictionaries(st.sampled_from(["model_a", "model_b", "model_c", "mode", "calcmode", "alpha", "beta",
                                             "seed", "dtype", "prune", "dice", "version", "weights_alpha"]),
                            JSON_VALUES, max_size=8))
def test_recipe_json(data):
    _only_our_errors(lambda: Recipe.from_json(json.dumps(data)))
