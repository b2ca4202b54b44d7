"""Tests for mergers.history: IDs, recipes kept exactly, search, the original's CSV and names, repair."""

import csv
import json
import logging
import re
import threading

import pytest

from mergers.dice import Dice
from mergers.errors import RecipeError
from mergers.history import CSV_HEADER, FILE_NAME, History, HistoryEntry, csv_row, merge_name
from mergers.recipe import Recipe

GRAD_V_SD1 = ("0.0,1.0,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,"
              "0.3333333333,0.25,0.1666666667,0.0833333333,0.0,0.0833333333,0.1666666667,0.25,"
              "0.3333333333,0.4166666667,0.5,0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0")
HALF_26 = ",".join(["0.5"] * 26)


def recipe(**changes) -> Recipe:
    """A small recipe; any field can be changed."""
    fields = {"model_a": "models/a.safetensors", "model_b": "models/b.safetensors", "alpha": 0.3}
    return Recipe(**{**fields, **changes})


def three(mode: str, **changes) -> Recipe:
    """A three-model recipe for ``mode``."""
    return recipe(model_c="models/c.safetensors", mode=mode, beta=0.2, **changes)


def filled(folder, count: int) -> History:
    """A history of ``count`` merges named m1, m2, …"""
    history = History(folder)
    for number in range(1, count + 1):
        history.add(recipe(alpha=number / 10), name=f"m{number}")
    return history


# --- add, get, IDs --------------------------------------------------------------------------


def test_add_then_get_by_id_and_from_the_end(tmp_path):
    history = filled(tmp_path, 3)
    assert [history.get(i).name for i in (1, 2, 3)] == ["m1", "m2", "m3"]
    assert history.get(-1).id == 3 and history.get(-2).id == 2 and history.get(-3).id == 1


def test_entry_fields_time_format_and_models(tmp_path):
    models = {"model_a": {"name": "a", "sha256": "ab" * 32, "shorthash": "abababab12"}}
    entry = History(tmp_path).add(recipe(), name="first", models=models)
    assert entry.id == 1 and entry.name == "first"
    assert re.fullmatch(r"\d{4}\.\d{2}\.\d{2} \d{2}\.\d{2}\.\d{2}", entry.time)
    assert History(tmp_path).get(1) == entry and entry.models == models


def test_recipe_round_trips_exactly(tmp_path):
    full = three("Add difference", calcmode="extract", gamma=0.7, seed=12, weights_alpha="GRAD_V",
                 elemental="IN04:attn2:0.5", include_exclude="exclude", include_exclude_blocks="IN01 VAE",
                 adjust="1,0,0,0,0,0,0,0", dice=Dice(mode="off", seed=77), dtype="fp16", prune=True)
    History(tmp_path).add(full, name="x")
    assert History(tmp_path).get(1).recipe == full
    line = json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))
    assert Recipe.from_dict(line["recipe"]) == full and line["recipe"] == full.to_dict()


def test_ids_continue_after_reopening(tmp_path):
    filled(tmp_path, 2)
    assert History(tmp_path).add(recipe(), name="again").id == 3
    assert [e.id for e in History(tmp_path).entries(newest_first=False)] == [1, 2, 3]


def test_unknown_id_is_a_recipe_error_naming_the_range(tmp_path):
    history = filled(tmp_path, 5)
    with pytest.raises(RecipeError, match="^no merge with ID 7 in history \\(1–5\\)$"):
        history.get(7)
    for bad in (0, -6):
        with pytest.raises(RecipeError, match=f"ID {bad} "):
            history.get(bad)


def test_get_from_an_empty_history(tmp_path):
    with pytest.raises(RecipeError, match="it is empty"):
        History(tmp_path / "new").get(-1)
    with pytest.raises(RecipeError, match="whole number"):
        filled(tmp_path, 1).get("1")


# --- listing and search ----------------------------------------------------------------------


def test_entries_newest_first_and_limit(tmp_path):
    history = filled(tmp_path, 5)
    assert [e.id for e in history.entries()] == [5, 4, 3, 2, 1]
    assert [e.id for e in history.entries(limit=3)] == [5, 4, 3]
    assert [e.id for e in history.entries(limit=3, newest_first=False)] == [3, 4, 5]
    assert [e.id for e in history.entries(limit=9)] == [5, 4, 3, 2, 1]
    assert history.entries(limit=0) == []


def test_search_and_or_and_case(tmp_path):
    history = History(tmp_path)
    history.add(recipe(model_a="Anime.safetensors", weights_alpha="GRAD_V"), name="one")
    history.add(recipe(model_a="Photo.safetensors", calcmode="cosineA"), name="two")
    history.add(recipe(model_a="anime2.safetensors", calcmode="cosineA"), name="three")
    assert [e.name for e in history.search("ANIME")] == ["three", "one"]
    assert [e.name for e in history.search("anime cosinea")] == ["three"]
    assert [e.name for e in history.search("anime cosinea", match_all=False)] == ["three", "two", "one"]
    assert [e.name for e in history.search("photo  0.9166666667", match_all=False)] == ["two", "one"]
    assert [e.name for e in history.search("cosineA", limit=1)] == ["three"]
    assert history.search("nothing-like-this") == [] and len(history.search("")) == 3


def test_search_finds_model_hashes(tmp_path):
    history = History(tmp_path)
    history.add(recipe(), name="x", models={"model_b": {"sha256": "FEED" + "0" * 60}})
    assert [e.name for e in history.search("feed000000")] == ["x"]


# --- CSV export -------------------------------------------------------------------------------


def test_csv_export_header_and_a_known_row(tmp_path):
    history = History(tmp_path)
    models = {"model_a": {"shorthash": "aaaaaaaaaa"}, "model_b": {"sha256": "b" * 64}, "model_c": {"name": "c"}}
    run = three("Triple sum", weights_alpha="GRAD_V", weights_beta="ALL:0.5", elemental="IN04:attn2:0.5",
                include_exclude="exclude", include_exclude_blocks="IN01, VAE", include_exclude_elements="norm,attn1",
                adjust="1,0,0,0,0,0,0,0", dice=Dice(mode="off", seed=42), dtype="fp16", reset_clip=True)
    entry = history.add(run, name="named, with a comma", models=models)
    rows = list(csv.reader(history.export_csv(tmp_path / "mergehistory.csv").open(newline="", encoding="utf-8")))
    assert rows[0] == list(CSV_HEADER) and len(CSV_HEADER) == 23
    assert rows[1] == [
        "1", entry.time, "named, with a comma", GRAD_V_SD1, HALF_26, "aaaaaaaaaa", "bbbbbbbbbb", "",
        "0.3", "0.2", "Triple sum:A*(1-alpha-beta)+B*alpha+C*beta", "True", "",
        "['safetensors', 'fp16', 'Reset CLIP ids']", "[]", "IN04:attn2:0.5", "normal", "42",
        "1,0,0,0,0,0,0,0", "0.3", "Exclude", "['IN01', 'VAE']", "norm,attn1",
    ]


def test_csv_scalar_row_modes_and_rows_in_id_order(tmp_path):
    history = History(tmp_path)
    for mode in ("Weight sum", "Add difference", "sum Twice"):
        history.add(three(mode), name=mode)
    rows = list(csv.reader(history.export_csv(tmp_path / "out" / "h.csv").open(newline="", encoding="utf-8")))
    assert [row[0] for row in rows[1:]] == ["1", "2", "3"]
    assert [row[10] for row in rows[1:]] == ["Weight sum:A*(1-alpha)+B*alpha", "Add difference:A+(B-C)*alpha",
                                            "sum Twice:(A*(1-alpha)+B*alpha)*(1-beta)+C*beta"]
    assert rows[1][3:5] == ["", ""] and rows[1][11] == "False" and rows[1][20] == "Off"


def test_csv_keeps_numbers_as_given_and_unreadable_weights_as_text():
    entry = HistoryEntry(1, "2024.01.02 03.04.05", "n", recipe(weights_alpha="0, 1 ," + "1," * 17 + "0"), {})
    assert csv_row(entry)[3] == "0.0,1.0," + "1.0," * 17 + "0.0"  # SDXL's 20 stay 20
    odd = HistoryEntry(2, "2024.01.02 03.04.05", "n", recipe(weights_alpha="NO_SUCH_PRESET"), {})
    assert csv_row(odd)[3] == "NO_SUCH_PRESET"


# --- names (the original's makemodelname) ---------------------------------------------------------


@pytest.mark.parametrize("mode, expected", [
    ("Weight sum", "a x 0.7 + b x 0.3"),
    ("Add difference", "a + (b - c) x 0.3"),
    ("Triple sum", "a x 0.5 + b x 0.3 + c x 0.2"),
    ("sum Twice", "(a x 0.7 + b x 0.3) x 0.8 + c x 0.2"),
])
def test_merge_name_scalar(mode, expected):
    assert merge_name(three(mode), {}) == expected


@pytest.mark.parametrize("mode, expected", [
    ("Weight sum", f"a x (1-alpha) + b x alpha (0.0,{GRAD_V_SD1})"),
    ("Add difference", f"a + (b - c) x alpha (0.0,{GRAD_V_SD1})"),
    ("Triple sum", f"a x (1-alpha-beta) + b x alpha + c x beta (alpha = 0.0,{GRAD_V_SD1},beta = 0.5,{HALF_26})"),
    ("sum Twice", f"(a x (1-alpha) + b x alpha) x (1-beta) + c x beta (0.0,{GRAD_V_SD1})_(0.5,{HALF_26})"),
])
def test_merge_name_block_weights(mode, expected):
    assert merge_name(three(mode, weights_alpha="GRAD_V", weights_beta="ALL:0.5"), {}) == expected


def test_merge_name_calcmode_suffix_and_given_names():
    names = {"model_a": "Anime v2", "model_b": "photo"}
    assert merge_name(recipe(calcmode="cosineA"), names) == "Anime v2 x 0.7 + photo x 0.3_cosineA"
    assert merge_name(recipe(calcmode="tensor", beta=0.25), {}) == "a x 0.7 + b x 0.3_tensor_beta_0.25"
    assert merge_name(three("Add difference", calcmode="trainDifference", alpha=1), {}) == \
        "a + (b - c) x 1.0_trainDifference"
    assert merge_name(recipe(model_a="C:\\sd\\x.y.safetensors", alpha=1 / 3), {}) == "x.y x 0.667 + b x 0.333"


# --- extra: what a merge was made for ----------------------------------------------------------------


def test_extra_round_trips_and_is_left_off_plain_lines(tmp_path):
    history = History(tmp_path)
    plain = history.add(recipe(), name="plain")
    searched = history.add(recipe(alpha=0.7), name="candidate", extra={"search": {"run": "r1", "candidate": 2}})
    lines = [json.loads(line) for line in (tmp_path / FILE_NAME).read_text(encoding="utf-8").splitlines()]
    assert "extra" not in lines[0] and lines[1]["extra"] == {"search": {"run": "r1", "candidate": 2}}
    assert History(tmp_path).entries(newest_first=False) == [plain, searched] and plain.extra == {}


def test_a_line_written_before_extra_existed_still_loads(tmp_path):
    old = {"id": 1, "time": "2024.01.02 03.04.05", "name": "old merge", "models": {"model_a": {"name": "a"}},
           "recipe": {"model_a": "a.safetensors", "model_b": "b.safetensors", "alpha": 0.4}}
    (tmp_path / FILE_NAME).write_text(json.dumps(old) + "\n", encoding="utf-8")
    history = History(tmp_path)
    entry = history.get(1)
    assert (entry.name, entry.recipe.alpha, entry.extra) == ("old merge", 0.4, {}) and history.problems == []
    assert entry.to_dict().keys() == {"id", "time", "name", "recipe", "models"}
    assert history.add(recipe(), name="new", extra={"k": 1}).id == 2


@pytest.mark.parametrize("extra", [[1, 2], "search", {1: "x"}])
def test_an_extra_that_is_not_a_json_object_is_refused(tmp_path, extra):
    with pytest.raises(RecipeError, match="extra must be a JSON object"):
        HistoryEntry.from_dict({"id": 1, "time": "t", "name": "n", "recipe": recipe().to_dict(), "extra": extra})
    with pytest.raises(RecipeError, match="extra must be a JSON object"):
        History(tmp_path).add(recipe(), name="n", extra=extra)
    with pytest.raises(RecipeError, match="extra is not plain JSON"):
        History(tmp_path).add(recipe(), name="n", extra={"when": object()})
    assert History(tmp_path).entries() == []


# --- a damaged file --------------------------------------------------------------------------------


def test_corrupted_lines_are_set_aside_with_a_warning(tmp_path, caplog):
    filled(tmp_path, 3)
    path = tmp_path / FILE_NAME
    lines = path.read_text(encoding="utf-8").splitlines()
    bad_recipe = json.dumps({"id": 9, "time": "t", "name": "x", "recipe": {"model_a": "a", "model_b": "b",
                                                                          "mode": "no such mode"}})
    damaged = [lines[0], "{not json", lines[1], bad_recipe, lines[2], '{"id": 10, "ti']
    path.write_text("\n".join(damaged) + "\n", encoding="utf-8")
    history = History(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mergers.history"):
        assert [e.name for e in history.entries(newest_first=False)] == ["m1", "m2", "m3"]
    assert f"{path} line 2" in caplog.text and "line 4" in caplog.text and "line 6" in caplog.text
    aside = list(tmp_path.glob(FILE_NAME + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text(encoding="utf-8").splitlines() == damaged
    assert path.read_text(encoding="utf-8").splitlines() == lines
    assert any("set aside" in p for p in history.problems) and any("line 4" in p for p in history.problems)
    assert history.add(recipe(), name="after").id == 4 and History(tmp_path).problems == []


def test_a_file_of_garbage_is_kept_not_emptied(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"\xff\xfe garbage\n")
    history = History(tmp_path)
    assert history.entries() == [] and history.problems
    assert [p.read_bytes() for p in tmp_path.glob(FILE_NAME + ".corrupt-*")] == [b"\xff\xfe garbage\n"]
    assert history.add(recipe(), name="first").id == 1


def test_a_newer_supermerger_line_is_kept_and_its_id_not_reused(tmp_path):
    filled(tmp_path, 1)
    path = tmp_path / FILE_NAME
    newer = json.dumps({"id": 2, "time": "t", "name": "future", "recipe": {"version": 99, "model_a": "a"}})
    path.write_text(path.read_text(encoding="utf-8") + newer + "\n", encoding="utf-8")
    history = History(tmp_path)
    assert [e.id for e in history.entries()] == [1] and "newer supermerger" in history.problems[0]
    assert history.add(recipe(), name="next").id == 3
    assert newer in path.read_text(encoding="utf-8") and not list(tmp_path.glob("*.corrupt-*"))


def test_append_after_a_last_line_without_newline(tmp_path):
    filled(tmp_path, 1)
    path = tmp_path / FILE_NAME
    path.write_text(path.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")
    History(tmp_path).add(recipe(), name="second")
    assert [e.name for e in History(tmp_path).entries(newest_first=False)] == ["m1", "second"]


# --- sharing a folder ------------------------------------------------------------------------------


def test_two_history_objects_on_one_folder(tmp_path):
    first, second = History(tmp_path), History(tmp_path)
    ids = [first.add(recipe(), name="1").id, second.add(recipe(), name="2").id, first.add(recipe(), name="3").id]
    assert ids == [1, 2, 3] and [e.name for e in second.entries()] == ["3", "2", "1"]


def test_concurrent_adds_from_threads_get_unique_ids(tmp_path):
    histories = [History(tmp_path), History(tmp_path)]
    ids, start = [], threading.Barrier(8)

    def worker(number):
        start.wait()
        for _ in range(8):
            ids.append(histories[number % 2].add(recipe(), name=f"t{number}").id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(ids) == list(range(1, 65))
    assert [e.id for e in History(tmp_path).entries(newest_first=False)] == list(range(1, 65))
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_adds_parse_the_file_only_when_someone_else_changed_it(tmp_path, monkeypatch):
    import mergers.history as history_module

    parsed = []
    real_parse = history_module._parse_file
    monkeypatch.setattr(history_module, "_parse_file", lambda path: parsed.append(path) or real_parse(path))
    ours, theirs = History(tmp_path), History(tmp_path)  # theirs: another tab, process or session
    recipe = Recipe(model_a="a", model_b="b")
    assert [ours.add(recipe, name="x").id for _ in range(3)] == [1, 2, 3]
    assert len(parsed) == 1  # the first add only: then our own last write tells the next ID
    assert theirs.add(recipe, name="y").id == 4
    assert ours.add(recipe, name="z").id == 5  # their line changed the file: ours reads it again
    assert [e.id for e in History(tmp_path).entries(newest_first=False)] == [1, 2, 3, 4, 5]
