"""The command line end to end, as a user runs it: a real process on real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergers.checkpoint import open_checkpoint
from mergers.cli import main
from mergers.demo import tiny_state_dict
from mergers.writer import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERMERGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    paths = []
    for seed, name in enumerate(("a", "b", "c"), start=1):
        path = folder / f"{name}.safetensors"
        save_checkpoint(path, tiny_state_dict("sdxl", seed=seed))
        paths.append(path)
    return paths


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mergers", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_merge_as_a_process_with_ui_names(models, tmp_path):
    out = tmp_path / "out.safetensors"
    done = run_cli("merge", *models, "--mode", "Add difference", "--alpha", "0.5", "-o", out, "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    assert "Add difference" in done.stdout and "SDXL" in done.stdout and str(out) in done.stdout
    with open_checkpoint(out) as merged, open_checkpoint(models[0]) as a, open_checkpoint(models[1]) as b, \
            open_checkpoint(models[2]) as c:
        key = "model.diffusion_model.middle_block.1.proj_in.weight"
        expected = a[key].float() + 0.5 * (b[key].float() - c[key].float())
        assert merged.dtype(key) == torch.float32
        assert torch.allclose(merged[key], expected, atol=2e-3)


def test_merge_with_block_weights_in_readable_form(models, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(models[0]), str(models[1]), "--weights-alpha", "ALL:0, OUT:1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "alpha by block: BASE:0, IN00-M00:0, OUT00-OUT08:1" in printed
    with open_checkpoint(out) as merged, open_checkpoint(models[0]) as a, open_checkpoint(models[1]) as b:
        assert torch.equal(merged["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"],
                           a["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"])
        assert torch.equal(merged["model.diffusion_model.output_blocks.1.0.emb_layers.1.weight"],
                           b["model.diffusion_model.output_blocks.1.0.emb_layers.1.weight"])


@pytest.mark.parametrize("args, message", [
    (["--mode", "Weight summ"], "did you mean 'weight_sum'"),
    (["--weights-alpha", "GRAD_X"], "GRAD_V"),
    (["--weights-alpha", "1,2,3"], "20 values"),
    (["--mode", "sum Twice"], "needs model C"),
    (["--calcmode", "cosineQ"], "unknown calculation mode"),
])
def test_bad_input_gets_one_clear_line(models, tmp_path, args, message):
    done = run_cli("merge", models[0], models[1], *args, "-o", tmp_path / "o.safetensors")
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_input_and_existing_output(models, tmp_path):
    done = run_cli("merge", models[0], tmp_path / "nope.safetensors", "-o", tmp_path / "o.safetensors")
    assert done.returncode == 2 and "nope.safetensors: no such checkpoint" in done.stderr
    done = run_cli("merge", models[0], models[1], "-o", models[2])
    assert done.returncode == 2 and "exists" in done.stderr


def test_info_shows_architecture_hashes_and_recipe(models, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(models[0]), str(models[1]), "--alpha", "0.25", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "SDXL base" and info["keys"] == len(tiny_state_dict("sdxl"))
    assert info["shorthash"] == info["sha256"][:10] and len(info["legacy_hash"]) == 8
    assert info["recipe"]["alpha"] == 0.25 and info["recipe"]["model_b"] == "b.safetensors"


def test_recipe_reruns_from_a_folder_even_after_renames(models, tmp_path, capsys):
    first = tmp_path / "first.safetensors"
    assert main(["merge", str(models[0]), str(models[1]), "--weights-alpha", "GRAD_A", "-o", str(first)]) == 0
    models[0].rename(models[0].with_name("renamed.safetensors"))  # found again by its sha256
    again = tmp_path / "again.safetensors"
    assert main(["recipe", str(first), "--models", str(models[0].parent), "-o", str(again)]) == 0
    with open_checkpoint(first) as one, open_checkpoint(again) as two:
        assert all(torch.equal(one[k], two[k]) for k in one)


def test_recipe_without_stored_recipe_or_inputs(models, tmp_path):
    done = run_cli("recipe", models[0], "-o", tmp_path / "x.safetensors")
    assert done.returncode == 2 and "no merge recipe that supermerger can re-run" in done.stderr


def test_demo_makes_models_and_really_merges(tmp_path):
    done = run_cli("demo", "--folder", tmp_path / "demo")
    assert done.returncode == 0, done.stderr
    assert "Weight sum" in done.stdout and "GRAD_V" not in done.stderr
    merged = tmp_path / "demo" / "demo_merged_GRAD_V.safetensors"
    with open_checkpoint(merged) as out, open_checkpoint(tmp_path / "demo" / "demo_a.safetensors") as a:
        assert len(out) == len(a) and json.loads(out.metadata["supermerger_recipe"])["weights_alpha"]


def test_help_is_there_for_every_command():
    for command in ("merge", "info", "recipe", "demo"):
        done = run_cli(command, "--help")
        assert done.returncode == 0 and "usage" in done.stdout
    assert "readable form" in run_cli("merge", "--help").stdout


def test_killing_the_cli_mid_write_leaves_no_output(tmp_path):
    """A kill -9 during `merge`: no output file, and the next save sweeps the killed run's temp file."""
    import time

    from mergers.writer import TEMP_MARK

    big = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    for seed, name in ((1, "a"), (2, "b")):
        state = tiny_state_dict("sd1", seed=seed)
        state[big] = torch.randn(49408, 768, generator=torch.Generator().manual_seed(seed))  # ~150 MB: a slow write
        save_checkpoint(tmp_path / f"{name}.safetensors", state)
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "mergers", "merge", str(tmp_path / "a.safetensors"),
                             str(tmp_path / "b.safetensors"), "-o", str(out)], cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name] and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL; TerminateProcess on Windows
    proc.wait()
    assert not out.exists()
    save_checkpoint(tmp_path / "next.safetensors", {"w": torch.ones(1)})
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


# `recipe`: every option takes effect ----------------------------------------------------------

@pytest.fixture
def merged(models, tmp_path):
    """A merge of A and B (fp16, as the inputs) whose stored recipe the tests replay."""
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(models[0]), str(models[1]), "--alpha", "0.3", "-o", str(out)]) == 0
    return out


def _replay(merged, models, out, *options) -> int:
    return main(["recipe", str(merged), "--models", str(models[0].parent), "-o", str(out), *map(str, options)])


def _dtypes(path) -> set:
    with open_checkpoint(path) as ckpt:
        return {ckpt.dtype(k) for k in ckpt if ckpt.dtype(k).is_floating_point}


def test_recipe_dtype_writes_that_precision(merged, models, tmp_path):
    assert _replay(merged, models, tmp_path / "as_stored.safetensors") == 0
    assert _dtypes(tmp_path / "as_stored.safetensors") == {torch.float16}
    assert _replay(merged, models, tmp_path / "fp32.safetensors", "--dtype", "fp32") == 0
    assert _dtypes(tmp_path / "fp32.safetensors") == {torch.float32}
    with open_checkpoint(tmp_path / "fp32.safetensors") as ckpt:  # and the replay records what it did
        assert json.loads(ckpt.metadata["supermerger_recipe"])["recipe"]["dtype"] == "fp32"


def test_recipe_prune_drops_ema_keys(models, tmp_path):
    for path in models[:2]:  # inputs holding an EMA key
        with open_checkpoint(path) as ckpt:
            state = {k: ckpt[k] for k in ckpt}
        save_checkpoint(path, {**state, "model_ema.decay": torch.tensor(0.9999)}, overwrite=True)
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(models[0]), str(models[1]), "-o", str(merged)]) == 0
    assert _replay(merged, models, tmp_path / "kept.safetensors") == 0
    assert _replay(merged, models, tmp_path / "pruned.safetensors", "--prune") == 0
    with open_checkpoint(tmp_path / "kept.safetensors") as kept, open_checkpoint(tmp_path / "pruned.safetensors") as pruned:
        assert "model_ema.decay" in kept and "model_ema.decay" not in pruned
        assert set(pruned) == set(kept) - {"model_ema.decay"}


def test_recipe_device_is_used_and_a_bad_one_refused(merged, models, tmp_path):
    assert _replay(merged, models, tmp_path / "cpu.safetensors", "--device", "cpu") == 0
    done = run_cli("recipe", merged, "--models", models[0].parent, "-o", tmp_path / "x.safetensors",
                   "--device", "no-such-device")
    assert done.returncode == 2 and "no-such-device" in done.stderr and not (tmp_path / "x.safetensors").exists()


def test_recipe_overwrite_replaces_only_when_asked(merged, models, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    done = run_cli("recipe", merged, "--models", models[0].parent, "-o", out)
    assert done.returncode == 2 and "exists" in done.stderr and out.read_bytes() == b"old"
    assert _replay(merged, models, out, "--overwrite") == 0
    assert _dtypes(out) == {torch.float16}


def test_recipe_output_and_models_folder(merged, models, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_cli("recipe", merged, "--models", elsewhere, "-o", tmp_path / "x.safetensors")
    assert done.returncode == 2 and "not found in" in done.stderr  # the inputs are looked for in --models only
    assert _replay(merged, models, tmp_path / "sub.safetensors") == 0 and (tmp_path / "sub.safetensors").exists()


def test_recipe_allow_non_finite_writes_what_is_otherwise_refused(models, tmp_path):
    for path, value in zip(models, (60000.0, 60000.0, -60000.0)):  # A + (B − C) passes fp16's range
        with open_checkpoint(path) as ckpt:
            state = {k: ckpt[k] for k in ckpt}
        key = "model.diffusion_model.out.2.bias"
        state[key] = torch.full_like(state[key], value)
        save_checkpoint(path, state, overwrite=True)
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, models), "--mode", "add_difference", "--alpha", "1",
                 "--allow-non-finite", "-o", str(merged)]) == 0
    done = run_cli("recipe", merged, "--models", models[0].parent, "-o", tmp_path / "x.safetensors")
    assert done.returncode == 2 and "not finite" in done.stderr
    assert _replay(merged, models, tmp_path / "x.safetensors", "--allow-non-finite") == 0
    with open_checkpoint(tmp_path / "x.safetensors") as ckpt:
        assert torch.isinf(ckpt["model.diffusion_model.out.2.bias"]).all()


def test_every_recipe_option_has_a_test():
    """A new `recipe` option needs a test above (that it takes effect) or a refusal."""
    from mergers.cli import build_parser

    args = vars(build_parser(()).parse_args(["recipe", "merged.safetensors", "-o", "out.safetensors"]))
    assert set(args) - {"command", "verbose", "run"} == {"file", "models", "output", "dtype", "device", "overwrite",
                                                        "allow_non_finite", "prune"}
