"""The XYZ plot in the A1111 v1.10.1 stand-in: a 3×3×2 plot (mbw preset × alpha × seed) makes 9 merges."""

import json

import numpy as np
from PIL import Image

from mergers.host import GenerationParams
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.xyz import AxisSpec, PlotRunner, PlotSpec, build_plan, check_recipes, context_for
from mergers.xyz.outputs import PLAN_INFO_KEY, plot_grids, save_outputs
from tests.test_a1111 import _host, checkpoints, webui  # noqa: F401 - pytest fixtures

SIZE = 64
PRESETS = "GRAD_V\nFLAT_25\nRING10_5"


def test_a_3x3x2_plot_runs_in_a1111_with_nine_merges_and_draws_its_grids(webui, tmp_path):  # noqa: F811
    host = _host(webui, tmp_path)
    session = MergeSession(host)
    merges = []
    merge = session.merge
    session.merge = lambda recipe, **options: merges.append(recipe) or merge(recipe, **options)
    recipe = Recipe(model_a="a.safetensors", model_b="b.safetensors")
    spec = PlotSpec(recipe, GenerationParams(prompt="a cat", steps=4, width=SIZE, height=SIZE, seed=1),
                    x=AxisSpec("mbw alpha", PRESETS), y=AxisSpec("alpha", "0.2, 0.5, 0.8"), z=AxisSpec("seed", "1, 2"))
    plan = build_plan(spec, context_for(recipe, host.resolve, session.history))
    check_recipes(plan, host.resolve)
    result = PlotRunner(session).run(plan)

    assert len(merges) == result.merges == 9 and result.complete and result.error is None
    assert len(webui.processing.processed_log) == 18
    grids = plot_grids(result)
    assert [g.z_label for g in grids] == ["seed = 1", "seed = 2"]
    folder = webui.data / (webui.shared.opts.outdir_grids or webui.shared.opts.outdir_txt2img_grids)
    paths = save_outputs(result, grids, folder)
    assert [p.parent for p in paths] == [folder, folder]
    with Image.open(paths[0]) as png:
        info = json.loads(png.info[PLAN_INFO_KEY])
        pixels = np.asarray(png.convert("RGB"))
    assert len(info["cells"]) == 18 and "a cat" in png.info["parameters"]
    # 3 columns and 3 rows of 64-pixel cells fill the bottom-right corner; each cell is its own image
    cells = [pixels[-SIZE * (3 - r):pixels.shape[0] - SIZE * (2 - r), -SIZE * (3 - c):pixels.shape[1] - SIZE * (2 - c)]
             for r in range(3) for c in range(3)]
    assert all(cell.shape == (SIZE, SIZE, 3) for cell in cells)
    # block weights decide every key, so alpha changes nothing (as in the original): each column is one
    # image, and an alpha step re-merges no key (a partial merge of 0 keys)
    assert len({cell.tobytes() for cell in cells}) == 3
    assert all(np.array_equal(cells[c], cells[3 + c]) for c in range(3))
    assert result.partial_merges == 8 and sum(m.alpha != 0.5 for m in merges) == 9 - 3
    made = result.cells
    for cell in plan.cells[:9]:
        expected = np.asarray(made[cell.index].image.convert("RGB"))
        assert np.array_equal(cells[cell.y * 3 + cell.x], expected)
    with Image.open(paths[1]) as other_seed:
        assert not np.array_equal(np.asarray(other_seed.convert("RGB")), pixels)
