"""XYZ plans, runs and grids on the test host (tiny real-layout models, a live model, a fake generator)."""

import json

import pytest
import torch
from PIL import Image

from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.dice import Dice
from mergers.errors import MergeError
from mergers.host import GenerationParams
from mergers.merge import merge_to_file
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.xyz import AxisSpec, PlotOptions, PlotQueue, PlotRunner, PlotSpec, XyzError, build_plan, context_for
from mergers.xyz.grid import BLANK_CELL, difference_image, draw_grid
from mergers.xyz.outputs import PLAN_INFO_KEY, plot_grids, save_outputs
from mergers.xyz.plan import check_recipes, merge_order, random_spec
from tests.ui_host import IMAGE_SIZE, UiHost

BASE = Recipe(model_a="a.safetensors", model_b="b.safetensors")


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def session(tmp_path):
    return MergeSession(UiHost.create(tmp_path))


def _plan(session, **axes):
    options = axes.pop("options", PlotOptions())
    spec = PlotSpec(axes.pop("recipe", BASE), session.host.default_generation(), options=options,
                    **{name: AxisSpec(*value) for name, value in axes.items()})
    plan = build_plan(spec, context_for(spec.recipe, session.host.resolve, session.history))
    check_recipes(plan, session.host.resolve)
    return plan


def _count_merges(session, monkeypatch) -> list:
    calls = []
    merge = session.merge

    def counting(recipe, **options):
        calls.append(recipe)
        return merge(recipe, **options)

    monkeypatch.setattr(session, "merge", counting)
    return calls


# --- planning ---------------------------------------------------------------------------------------


def test_cells_sharing_a_recipe_share_one_merge_even_when_seeds_are_on_x(session):
    plan = _plan(session, x=("seed", "1, 2, 3"), y=("alpha", "0.2, 0.8"))
    assert len(plan.cells) == 6 and plan.merges == 2
    assert plan.groups == ((0, 1, 2), (3, 4, 5))
    assert [c.params.seed for c in plan.cells[:3]] == [1, 2, 3]
    assert [c.recipe.alpha for c in plan.cells] == [0.2] * 3 + [0.8] * 3


def test_merge_order_follows_the_nearest_recipe_and_counts_partial_merges(session):
    plan = _plan(session, x=("alpha", "0.2, 0.8"), y=("model_B", "b.safetensors, c.safetensors"))
    recipes = [plan.cells[g[0]].recipe for g in plan.groups]
    # both B models' alphas are merged in a row: switching B (a full merge) happens once
    assert [r.model_b for r in recipes] == ["b.safetensors", "b.safetensors", "c.safetensors", "c.safetensors"]
    assert plan.partial_merges == 2


def test_a_plan_round_trips_through_json_and_fixes_seed_minus_one(session):
    spec = PlotSpec(BASE, GenerationParams(seed=-1), x=AxisSpec("alpha", "0.1,0.2"), options=PlotOptions(swap_xy=True))
    assert PlotSpec.from_json(spec.to_json()) == spec
    plan = build_plan(spec, context_for(BASE, session.host.resolve))
    assert len({c.params.seed for c in plan.cells}) == 1 and plan.cells[0].params.seed != -1


@pytest.mark.parametrize("data,message", [
    ([], "must be a JSON object"),
    ({"x": {}}, "no 'recipe'"),
    ({"recipe": BASE.to_dict(), "extra": 1}, "unknown plot plan field"),
    ({"recipe": BASE.to_dict(), "x": {"type": "alpha", "valeus": "1"}}, "'x': unknown key"),
])
def test_bad_plan_files_say_what_is_wrong(data, message):
    with pytest.raises(XyzError, match=message):
        PlotSpec.from_dict(data)


def test_a_cell_whose_recipe_cannot_run_is_named_before_anything_runs(session):
    with pytest.raises(XyzError, match=r"cell X = Add difference: .*needs model C"):
        _plan(session, x=("merge mode", "Weight sum, Add difference"))
    with pytest.raises(XyzError, match=r"cell X = xl.safetensors: .*SDXL"):
        _plan(session, x=("model_B", "c.safetensors, xl.safetensors"))


def test_merge_id_axis_replays_history_and_other_axes_apply_on_top(session):
    session.merge(BASE.with_changes(weights_alpha="GRAD_V", alpha=0.1))
    plan = _plan(session, x=("merge ID", "-1"), y=("seed", "3, 4"))
    assert plan.merges == 1 and plan.cells[0].recipe.weights_alpha == "GRAD_V"


def test_random_axis_gives_each_cell_its_own_dice_seed(session):
    recipe = BASE.with_changes(dice=Dice(mode="R"))
    plan = build_plan(random_spec(recipe, GenerationParams(seed=5), 12), context_for(recipe, session.host.resolve))
    seeds = [c.recipe.dice.seed for c in plan.cells]
    assert len(plan.cells) == 12 and len(set(seeds)) == 12 and plan.spec.columns == 10
    with pytest.raises(XyzError, match="Random Mode"):
        random_spec(BASE, GenerationParams(), 3)


# --- running ----------------------------------------------------------------------------------------


def test_a_3x3x2_plot_merges_each_distinct_recipe_once(session, monkeypatch):
    calls = _count_merges(session, monkeypatch)
    plan = _plan(session, x=("mbw alpha", "GRAD_V\nFLAT_25\nRING10_5"), y=("alpha", "0.2, 0.5, 0.8"),
                 z=("seed", "1, 2"))
    result = PlotRunner(session).run(plan)
    assert len(calls) == plan.merges == 9 and result.merges == 9 and len(set(calls)) == 9
    assert result.complete and not result.stopped and result.error is None
    assert len(session.host.generated) == 18
    assert len(session.history.entries()) == 9
    # cells along the seed axis come from one merge: same merge name, different seeds
    assert {result.cells[i].merge_name for i in plan.groups[0]} == {result.cells[plan.groups[0][0]].merge_name}


def test_partial_merges_leave_the_model_as_a_full_merge_would(session, tmp_path):
    plan = _plan(session, x=("mbw alpha", "GRAD_V\nFLAT_25\nALL:0.5, OUT05:0.9"))
    result = PlotRunner(session).run(plan)
    assert result.partial_merges == 2
    last = plan.cells[plan.groups[-1][0]].recipe
    merge_to_file(last, tmp_path / "ref.safetensors", resolve=session.host.resolve)
    live = session.host.live_model().tensors()
    with open_checkpoint(tmp_path / "ref.safetensors") as ref:
        assert all(torch.equal(live[k], ref[k]) for k in ref if k in live)


def test_stop_ends_after_the_current_cell_and_the_grid_keeps_its_layout(session):
    plan = _plan(session, x=("alpha", "0.1, 0.4, 0.7"), y=("seed", "1, 2"))
    runner = PlotRunner(session)

    def stop_after_two(done, total, cell):
        if done == 2:
            runner.stop()

    result = runner.run(plan, on_cell=stop_after_two)
    assert result.stopped and len(result.cells) == 2 and not result.complete
    (grid,) = plot_grids(result)
    made = {plan.cells[i].position for i in result.cells}
    blank = [cell for cell in plan.cells if cell.position not in made]
    assert len(blank) == 4
    right, bottom = grid.image.size
    for cell in blank:  # cells are IMAGE_SIZE squares laid from the bottom-right corner
        x = right - (3 - cell.x) * IMAGE_SIZE + IMAGE_SIZE // 2
        y = bottom - (2 - cell.y) * IMAGE_SIZE + IMAGE_SIZE // 2
        assert grid.image.getpixel((x, y)) == BLANK_CELL
    assert "stopped" in result.summary


def test_a_failing_merge_ends_the_plot_with_what_was_made(session, monkeypatch):
    plan = _plan(session, x=("alpha", "0.1, 0.4"))
    merge = session.merge

    def fail_second(recipe, **options):
        if recipe.alpha == 0.4:
            raise MergeError("disk on fire")
        return merge(recipe, **options)

    monkeypatch.setattr(session, "merge", fail_second)
    result = PlotRunner(session).run(plan)
    assert len(result.cells) == 1 and "X = 0.4: disk on fire" in result.error


def test_a_host_without_a_generator_is_refused_clearly(tmp_path):
    session = MergeSession(UiHost.create(tmp_path, live_from=None))
    plan = _plan(session, x=("alpha", "0.1"))
    with pytest.raises(MergeError, match="needs an image generator"):
        PlotRunner(session).run(plan)


def test_reserved_plots_run_one_after_another(session):
    queue = PlotQueue()
    for alphas in ("0.1, 0.2", "0.3"):
        queue.reserve(_plan(session, x=("alpha", alphas)))
    done = queue.run_all(PlotRunner(session))
    assert [(item.id, item.status, len(item.result.cells)) for item in done] == [(1, "finished", 2), (2, "finished", 1)]
    queue.reserve(_plan(session, x=("alpha", "0.5")))
    queue.remove(-1)
    assert queue.items() == [] or all(item.status == "running" for item in queue.items())
    with pytest.raises(MergeError, match="no reservation 7"):
        queue.remove(7)


# --- grids and files ----------------------------------------------------------------------------------


def test_grid_size_follows_cells_and_labels():
    cells = [[Image.new("RGB", (40, 30), (255, 0, 0))] * 3] * 2
    bare = draw_grid(cells, ["a", "b", "c"], ["", ""])
    labelled = draw_grid(cells, ["a", "b", "c"], ["row 1", "row 2"], title="title")
    assert bare.width == 3 * 40 and labelled.width == 3 * 40 + 40 * 3 // 4
    assert bare.height > 2 * 30 and labelled.height > bare.height  # the title band
    assert labelled.getpixel((labelled.width - 1, labelled.height - 1)) == (255, 0, 0)


def test_difference_image_measures_changed_channel_values():
    a = Image.new("RGB", (10, 10), (0, 0, 0))
    b = a.copy()
    b.paste((100, 10, 0), (0, 0, 5, 10))  # half the pixels, one channel of three over the threshold
    diff, percent = difference_image(a, b)
    assert percent == pytest.approx(100 / 6) and difference_image(a, a)[1] == 0.0
    assert diff.getpixel((9, 9)) == (255, 255, 255)


def test_outputs_are_grids_per_z_with_the_plan_in_png_info_plus_csv_and_gif(session, tmp_path):
    options = PlotOptions(swap_xy=True, save_csv=True, save_gif=True, difference=True)
    plan = _plan(session, x=("alpha", "0.1, 0.9"), y=("seed", "1, 2, 3"), z=("prompt", "a cat\na dog"), options=options)
    result = PlotRunner(session).run(plan)
    grids = plot_grids(result)
    assert [g.z_label for g in grids] == ["prompt = a cat", "prompt = a dog"] * 2
    assert [g.difference for g in grids] == [False, False, True, True]
    # swapped: X's 2 values go down, Y's 3 across
    assert grids[0].image.width == 3 * IMAGE_SIZE + IMAGE_SIZE * 3 // 4
    paths = save_outputs(result, grids, tmp_path / "grids")
    assert sorted(p.suffix for p in paths) == [".csv", ".gif"] + [".png"] * 4
    with Image.open(paths[0]) as png:
        info = json.loads(png.info[PLAN_INFO_KEY])
        assert "a cat" in png.info["parameters"]
    assert len(info["cells"]) == 12 and info["cells"][0]["made"] and info["cells"][0]["history_id"] is not None
    csv_path = next(p for p in paths if p.suffix == ".csv")
    rows = csv_path.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 13 and rows[0].startswith("cell,X,Y,Z")
    with Image.open(next(p for p in paths if p.suffix == ".gif")) as gif:
        assert gif.n_frames >= 2


# --- command line -------------------------------------------------------------------------------------


def _write_plan(tmp_path, **axes) -> str:
    spec = PlotSpec(BASE, GenerationParams(seed=1), **{k: AxisSpec(*v) for k, v in axes.items()})
    path = tmp_path / "plan.json"
    path.write_text(spec.to_json(), encoding="utf-8")
    return str(path)


def test_cli_dry_run_prints_cells_and_merges(session, tmp_path, capsys):
    plan = _write_plan(tmp_path, x=("mbw alpha", "GRAD_V\nFLAT_25"), y=("seed", "1, 2"))
    code = main(["xyz", "--plan", plan, "--models", str(session.host.models_dir), "--dry-run"],
                command_modules=("mergers.xyz.cli",))
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("4 cells (2 × 2 × 1), 2 merges (1 swap only")
    assert "merge 2 (2 cells): X = FLAT_25, Y = 1; X = FLAT_25, Y = 2" in out


def test_cli_without_dry_run_says_there_is_no_generator(session, tmp_path, capsys):
    plan = _write_plan(tmp_path, x=("alpha", "0.1"))
    code = main(["xyz", "--plan", plan, "--models", str(session.host.models_dir)], command_modules=("mergers.xyz.cli",))
    assert code != 0 and "no image generator" in capsys.readouterr().err


def test_cli_reports_a_bad_axis_value(session, tmp_path, capsys):
    plan = _write_plan(tmp_path, x=("alpha", "0.1, x"))
    code = main(["xyz", "--plan", plan, "--models", str(session.host.models_dir), "--dry-run"],
                command_modules=("mergers.xyz.cli",))
    assert code != 0 and "X axis (alpha), value 2 'x'" in capsys.readouterr().err


def test_merge_order_is_stable_for_equal_recipes(session):
    plan = _plan(session, x=("seed", "1, 2"), y=("prompt", "p\nq"))
    assert merge_order(plan.cells) == ((0, 1, 2, 3),)

