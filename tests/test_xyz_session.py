"""Partial re-merges (MergeSession.merge(only_changed=True)) and Swapper.apply(keep_unwritten=True)."""

import pytest
import torch

from mergers.arch.layouts import block_ids
from mergers.checkpoint import open_checkpoint
from mergers.merge import merge_to_file
from mergers.recipe import Recipe
from mergers.session import MergeSession, same_but_ratios
from mergers.swap import Swapper
from mergers.weights import parse_weights
from tests.ui_host import UiHost

BASE = Recipe(model_a="a.safetensors", model_b="b.safetensors", weights_alpha="GRAD_V")


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def session(tmp_path):
    return MergeSession(UiHost.create(tmp_path))


def _matches_full_merge(session, recipe, path) -> bool:
    merge_to_file(recipe, path, resolve=session.host.resolve)
    live = session.host.live_model().tensors()
    with open_checkpoint(path) as ref:
        return all(torch.equal(live[key], ref[key]) for key in ref if key in live)


def test_only_changed_swaps_the_keys_of_changed_blocks_and_equals_a_full_merge(session, tmp_path):
    first = session.merge(BASE)
    values = list(parse_weights("GRAD_V", "sd1").values)
    values[block_ids("sd1").index("OUT05")] = 0.123  # one block differs from GRAD_V
    changed = BASE.with_changes(weights_alpha=",".join(map(str, values)))
    second = session.merge(changed, only_changed=True)
    out05 = [key for key in session.host.live_model().tensors() if "output_blocks.5." in key]
    assert first.rewritten is None and second.rewritten == len(out05) > 0
    assert "changed keys re-merged" in second.summary
    assert _matches_full_merge(session, changed, tmp_path / "ref.safetensors")
    same_again = session.merge(changed.with_changes(alpha=0.9), only_changed=True)  # alpha unused under weights
    assert same_again.rewritten == 0


def test_only_changed_merges_in_full_when_more_than_ratios_differ(session, tmp_path):
    session.merge(BASE)
    other_b = session.merge(BASE.with_changes(model_b="c.safetensors"), only_changed=True)
    assert other_b.rewritten is None
    assert _matches_full_merge(session, BASE.with_changes(model_b="c.safetensors"), tmp_path / "ref.safetensors")


def test_only_changed_after_a_restore_merges_in_full(session):
    session.merge(BASE)
    session.restore()
    assert session.merge(BASE.with_changes(alpha=0.1), only_changed=True).rewritten is None


def test_an_include_change_puts_keys_left_out_back_to_model_a(session, tmp_path):
    session.merge(BASE)
    only_out = BASE.with_changes(include_exclude="include", include_exclude_blocks="OUT00 OUT01 OUT02 OUT03")
    assert session.merge(only_out, only_changed=True).rewritten > 0
    assert _matches_full_merge(session, only_out, tmp_path / "ref.safetensors")


def test_same_but_ratios_lists_what_may_differ():
    assert same_but_ratios(BASE, BASE.with_changes(weights_alpha="FLAT_25", elemental="IN01::0", adjust="1"))
    assert not same_but_ratios(BASE, BASE.with_changes(calcmode="cosineA"))
    assert not same_but_ratios(BASE, BASE.with_changes(dtype="fp16"))
    ties = BASE.with_changes(mode="ties", model_c="c.safetensors", more_models=("d.safetensors",))
    assert not same_but_ratios(ties, ties.with_changes(more_models=("e.safetensors",)))  # D changes every key


def test_keep_unwritten_leaves_earlier_changes_in_place(tmp_path):
    host = UiHost.create(tmp_path)
    live = host.live_model()
    keys = sorted(k for k, t in live.tensors().items() if t.is_floating_point())[:2]
    swapper = Swapper(live)
    swapper.apply([(k, torch.zeros_like(live.tensors()[k])) for k in keys])
    report = swapper.apply([(keys[0], torch.ones_like(live.tensors()[keys[0]]))], keep_unwritten=True)
    assert report.reverted == 0 and swapper.changed_keys == frozenset(keys)
    assert torch.all(live.tensors()[keys[1]] == 0) and torch.all(live.tensors()[keys[0]] == 1)
    report = swapper.apply([(keys[0], torch.ones_like(live.tensors()[keys[0]]))])
    assert report.reverted == 1 and swapper.changed_keys == frozenset(keys[:1])
