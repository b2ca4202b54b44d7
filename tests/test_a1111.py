"""The A1111 host and glue against the A1111 v1.10.1 stand-in (tests/a1111_stub).

The stand-in is put on ``sys.path`` by the ``webui`` fixture only, over a fresh
data folder with three real-layout SD1 checkpoints; the first is loaded (fp16,
hijacked names) and a LoRA is selected, which the stand-in's Lora extension
patches into the weights at the next generation, as A1111's does.
"""

from __future__ import annotations

import importlib.util
import json
import re
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mergers.checkpoint import SafetensorsCheckpoint, open_checkpoint
from mergers.demo import tiny_state_dict
from mergers.errors import CheckpointError, MergeError
from mergers.host import GenerationParams
from mergers.hosts.a1111 import A1111Host, A1111Modules, undo_lora
from mergers.merge import merge_to_file
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.swap import live_tensors
from mergers.writer import save_checkpoint
from platforms import WINDOWS, needs_extension_link, needs_gradio

ROOT = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "a1111_stub"
STUB_TOP_LEVEL = {"networks", "launch", "supermerger.py", "a1111_stub_live_model"}

TE_LAYER = "transformer_text_model_encoder_layers_0_self_attn_q_proj"
TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
UNET_LAYER = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
TOKEN_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
FP8_KEY = "model.diffusion_model.out.2"  # a layer given an fp16 copy, as A1111 keeps for fp8 weights

PARAMS = GenerationParams(prompt="a cat in a hat", negative_prompt="blurry", steps=12, sampler="DPM++ 2M",
                          cfg_scale=5.5, width=64, height=48, seed=1234, batch_size=2)


def _forget_stub_modules() -> None:
    for name in list(sys.modules):
        if name == "modules" or name.startswith("modules.") or name in STUB_TOP_LEVEL:
            del sys.modules[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Three SD1 checkpoints with every key of a real one (EMA and scheduler buffers too), fp16."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = [folder / f"{name}.safetensors" for name in "abc"]
    for seed, path in enumerate(paths):
        save_checkpoint(path, tiny_state_dict("sd1", seed=seed, optional=True))
    return paths


@pytest.fixture
def webui(tmp_path, monkeypatch, checkpoints):
    """A1111's modules over a fresh data folder; "a" loaded, a LoRA selected (applied by the next generation)."""
    data = tmp_path / "webui"
    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    (data / "extensions").mkdir()
    extension = data / "extensions" / "supermerger"  # a real folder (its data/ lands here, not in the repo)
    extension.mkdir()
    for part in ("scripts", "mergers", "install.py"):
        if WINDOWS:  # a clone there, as users install it (Wine's symlinks make nothing)
            (shutil.copytree if (ROOT / part).is_dir() else shutil.copyfile)(ROOT / part, extension / part)
        else:
            (extension / part).symlink_to(ROOT / part)
    for path in checkpoints:
        shutil.copyfile(path, models / path.name)
    monkeypatch.setenv("A1111_STUB_DATA_DIR", str(data))
    monkeypatch.syspath_prepend(str(STUB))
    _forget_stub_modules()
    try:
        yield _start(data)
    finally:
        _forget_stub_modules()


def _start(data: Path) -> SimpleNamespace:
    import launch
    import networks
    from modules import call_queue, devices, paths, processing, script_callbacks, scripts, sd_hijack, sd_models, shared

    sd_models.list_models()
    shared.opts.data["sd_model_checkpoint"] = "a.safetensors"
    model = shared.sd_model
    webui = SimpleNamespace(shared=shared, sd_models=sd_models, processing=processing, call_queue=call_queue,
                            paths=paths, devices=devices, script_callbacks=script_callbacks, scripts=scripts,
                            sd_hijack=sd_hijack, networks=networks, launch=launch, model=model, data=data)
    _apply_lora(webui)
    return webui


def _apply_lora(webui: SimpleNamespace) -> None:
    """Select a LoRA as A1111's Lora extension does; the next generation patches the weights."""
    networks, model = webui.networks, webui.model
    networks.assign_network_names_to_compvis_modules(model)
    layers = model.network_layer_mapping
    deltas = {name: torch.full_like(layers[name].weight, 0.25) for name in (TE_LAYER, UNET_LAYER)}
    networks.loaded_networks[:] = [networks.Network("detail", {k: networks.NetworkModule(v) for k, v in deltas.items()})]


def _host(webui: SimpleNamespace, tmp_path: Path) -> A1111Host:
    modules = A1111Modules(webui.shared, webui.sd_models, webui.processing, webui.call_queue, webui.paths,
                           webui.devices)
    host = A1111Host(modules, extension_dir=tmp_path / "extension")
    webui.script_callbacks.on_model_loaded(host.model_loaded)
    return host


def _layer(webui: SimpleNamespace, name: str) -> torch.nn.Module:
    return webui.model.network_layer_mapping[name]


def _pixels(generated) -> list[np.ndarray]:
    return [np.asarray(image) for image in generated.images]


def _same_images(left, right) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_pixels(left), _pixels(right), strict=True))


def _file_tensors(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors for every live key, in the live dtype (A1111 casts on load)."""
    with open_checkpoint(path) as ckpt:
        return {key: ckpt[key].to(tensor.dtype) for key, tensor in like.items()}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in live_tensors(model).items()}


def _equal(live: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, skip=()) -> list[str]:
    """Keys whose live tensor is not bit-equal to the expected one."""
    return [k for k in live if k not in skip and not torch.equal(live[k], expected[k])]


# --- the glue, loaded as A1111 loads it ---------------------------------------------------------


@needs_extension_link
def test_script_registers_the_tab_as_a1111_loads_it(webui):
    webui.scripts.load_scripts()
    assert str(webui.data / "extensions" / "supermerger") not in sys.path  # only while it loaded
    (_, module), = webui.scripts.scripts_data
    assert module.__name__ == "supermerger.py"  # A1111's spec name: the file name
    assert module.host.data_dir == webui.data / "extensions" / "supermerger" / "data"
    callbacks = webui.script_callbacks.callback_map
    assert [c.callback for c in callbacks["callbacks_model_loaded"]] == [module.host.model_loaded]
    assert len(callbacks["callbacks_app_started"]) == 1  # the indicator's routes; the API's need --api
    assert len(callbacks["callbacks_ui_tabs"]) == 1
    if importlib.util.find_spec("mergers.ui") is None:
        pytest.skip("mergers.ui is not there yet: the glue registers no tab")
    import gradio as gr

    (blocks, title, elem_id), = callbacks["callbacks_ui_tabs"][0].callback()
    assert isinstance(blocks, gr.Blocks)
    assert (title, elem_id) == ("SuperMerger", "supermerger")


def test_glue_imports_no_forge_module_and_mergers_no_a1111():
    glue = (ROOT / "scripts" / "supermerger.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import)\s+(backend|modules_forge|ldm_patched)\b", glue, re.MULTILINE)
    offenders = [p for p in (ROOT / "mergers").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+modules\b", p.read_text(encoding="utf-8"), re.MULTILINE)]
    assert offenders == []
    assert not (ROOT / "modules").exists()  # it would shadow A1111's package


# --- the checkpoint list ------------------------------------------------------------------------


def test_list_models_shows_titles_files_and_known_short_hashes(webui, tmp_path):
    host = _host(webui, tmp_path)
    a_info = webui.model.sd_checkpoint_info
    entries = {Path(e.path).name: e for e in host.list_models()}
    assert sorted(entries) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert entries["a.safetensors"].shorthash == a_info.shorthash  # hashed when A1111 loaded it
    assert entries["a.safetensors"].title == f"a.safetensors [{a_info.shorthash}]"
    assert entries["b.safetensors"].shorthash is None  # A1111 hashes a file when it first loads it
    assert host.models_dir == webui.data / "models" / "Stable-diffusion"


@pytest.mark.parametrize("spelling", ["title", "name", "stem", "shorthash", "sha256", "stale title"])
def test_resolve_finds_a_checkpoint_however_a1111_names_it(webui, tmp_path, spelling, caplog):
    host = _host(webui, tmp_path)
    path = webui.data / "models" / "Stable-diffusion" / "b.safetensors"
    sha256 = SafetensorsCheckpoint(path).sha256()
    if spelling == "title":  # A1111 titles a file "name [shorthash]" once it has hashed it
        webui.sd_models.checkpoints_list["b.safetensors"].calculate_shorthash()
    name = {"title": f"b.safetensors [{sha256[:10]}]", "name": "b.safetensors", "stem": "b",
            "shorthash": sha256[:10], "sha256": sha256, "stale title": "b.safetensors [0123456789]"}[spelling]
    assert host.resolve(name) == path
    if spelling == "stale title":
        assert "hash has changed" in caplog.text


@pytest.mark.parametrize("name", ["nope.safetensors", "safetensors", "b.safetensors [0123456789] x", "0123456789"])
def test_resolve_refuses_what_a1111_does_not_list(webui, tmp_path, name):
    host = _host(webui, tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(repr(name))):
        host.resolve(name)


def test_models_dir_follows_ckpt_dir(webui, tmp_path):
    host = _host(webui, tmp_path)
    webui.shared.cmd_opts.ckpt_dir = str(tmp_path / "elsewhere")
    assert host.models_dir == tmp_path / "elsewhere"


# --- merge, generate, restore -------------------------------------------------------------------


@pytest.fixture
def merged(webui, tmp_path):
    """Generate (LoRA applied), merge a+b into the loaded model; what was there before."""
    host = _host(webui, tmp_path)
    session = MergeSession(host)
    fp8_layer = webui.model.model.diffusion_model.out._modules["2"]
    fp8_layer.fp16_weight = fp8_layer.weight.data.clone().half()
    before = SimpleNamespace(image=session.generate(PARAMS), tensors=live_tensors(webui.model),
                             empty_prompt=webui.model.cond_stage_model_empty_prompt.clone())
    assert webui.processing.StableDiffusionProcessing.cached_c[0] is not None  # the cache trap is armed
    lora_layer = _layer(webui, UNET_LAYER)  # the LoRA is in the weights, its backup beside them
    assert lora_layer.network_current_names != ()
    assert torch.equal(lora_layer.weight, (lora_layer.network_weights_backup.float() + 0.25).half())
    titles = {Path(e.path).stem: e.title for e in host.list_models()}
    outcome = session.merge(Recipe(model_a=titles["a"], model_b=titles["b"], alpha=0.3))
    expected = tmp_path / "expected.safetensors"
    merge_to_file(outcome.recipe, expected, resolve=host.resolve)
    return SimpleNamespace(host=host, session=session, outcome=outcome, before=before, expected=expected)


def test_merge_writes_the_merged_weights_into_the_same_parameters(webui, merged):
    live = live_tensors(webui.model)
    assert merged.outcome.swapped
    assert _equal(live, _file_tensors(merged.expected, live)) == []
    assert live.keys() == merged.before.tensors.keys()
    assert all(live[k] is merged.before.tensors[k] for k in live)  # no rebuild: the same objects
    assert "cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight" in dict(
        webui.model.named_parameters())  # still hijacked


def test_merge_resets_the_lora_extension_state_and_a1111_caches(webui, merged):
    processing, model = webui.processing, webui.model
    for name in (TE_LAYER, UNET_LAYER):
        layer = _layer(webui, name)
        assert (layer.network_weights_backup, layer.network_bias_backup, layer.network_current_names) == (None, None, ())
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert processing.StableDiffusionProcessing.cached_uc == [None, None]
    assert processing.StableDiffusionProcessingTxt2Img.cached_hr_c == [None, None]
    merged_tokens = live_tensors(model)[TOKEN_KEY]
    assert torch.equal(model.cond_stage_model_empty_prompt, merged_tokens[:1])
    assert not torch.equal(model.cond_stage_model_empty_prompt, merged.before.empty_prompt)
    fp8_layer = model.model.diffusion_model.out._modules["2"]
    assert torch.equal(fp8_layer.fp16_weight, fp8_layer.weight.data.half())


def test_generate_after_merge_sends_the_params_and_merge_to_process_images(webui, merged):
    generated = merged.session.generate(PARAMS)
    p, job = webui.processing.processed_log[-1]
    assert (p.prompt, p.negative_prompt, p.steps, p.sampler_name, p.cfg_scale) == (
        PARAMS.prompt, PARAMS.negative_prompt, PARAMS.steps, PARAMS.sampler, PARAMS.cfg_scale)
    assert (p.width, p.height, p.seed, p.batch_size, p.n_iter) == (64, 48, 1234, 2, 1)
    assert p.extra_generation_params["SuperMerger"] == merged.outcome.name
    assert Recipe.from_json(p.extra_generation_params["SuperMerger recipe"]) == merged.outcome.recipe
    assert job == "supermerger" and webui.shared.state.job == ""  # between state.begin() and end()
    assert f"SuperMerger: {merged.outcome.name}" in generated.infotext
    assert len(generated.images) == 2 and generated.images[0].size == (64, 48)
    assert not _same_images(generated, merged.before.image)


def test_generation_reapplies_the_lora_on_the_merged_weights(webui, merged):
    merged_weight = live_tensors(webui.model)[UNET_KEY + ".weight"].clone()
    merged.session.generate(PARAMS)
    layer = _layer(webui, UNET_LAYER)
    assert torch.equal(layer.network_weights_backup, merged_weight)
    assert torch.equal(layer.weight, (merged_weight.float() + 0.25).half())


def test_restore_puts_back_the_original_bytes_and_image(webui, merged):
    assert merged.session.restore() > 0
    live = live_tensors(webui.model)
    assert _equal(live, _file_tensors(_source(webui), live)) == []
    assert _same_images(merged.session.generate(PARAMS), merged.before.image)


def _source(webui) -> Path:
    return Path(webui.model.sd_checkpoint_info.filename)


def test_generation_holds_the_queue_lock(webui, merged, monkeypatch):
    seen = []
    process_images = webui.processing.process_images
    monkeypatch.setattr(webui.processing, "process_images",
                        lambda p: seen.append(webui.call_queue.queue_lock.locked()) or process_images(p))
    merged.session.generate(PARAMS)
    assert seen == [True] and not webui.call_queue.queue_lock.locked()
    assert merged.host.lock() is webui.call_queue.queue_lock


def test_a_merge_failing_half_way_leaves_the_model_as_it_was(webui, tmp_path, monkeypatch):
    host = _host(webui, tmp_path)
    session = MergeSession(host)
    before_image = session.generate(PARAMS)
    before = _snapshot(webui.model)
    lora_keys = {UNET_KEY + ".weight", TE_KEY + ".weight", TE_KEY + ".bias"}
    originals = _file_tensors(_source(webui), before)
    objects = live_tensors(webui.model)
    _fail_reading("b.safetensors", after=200, monkeypatch=monkeypatch)
    with pytest.raises(MergeError, match="b.safetensors"):
        session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
    live = live_tensors(webui.model)
    assert all(live[k] is objects[k] for k in live)
    assert _equal(live, before, skip=lora_keys) == []
    assert _equal({k: live[k] for k in lora_keys}, originals) == []  # the LoRA taken out, to be re-applied
    assert session.current is None
    assert _same_images(session.generate(PARAMS), before_image)


def _fail_reading(filename: str, *, after: int, monkeypatch) -> None:
    """Make reads of ``filename`` fail after ``after`` tensors, as a truncated or vanished file does
    (reads into buffers, and the mapped reads an in-place swap makes)."""
    count = {"n": 0}

    def failing(real):
        def method(self, key, *args, **kwargs):
            if self.path.name == filename:
                count["n"] += 1
                if count["n"] > after:
                    raise CheckpointError(f"{self.path}: read failed at {key}")
            return real(self, key, *args, **kwargs)
        return method

    monkeypatch.setattr(SafetensorsCheckpoint, "_read", failing(SafetensorsCheckpoint._read))
    monkeypatch.setattr(SafetensorsCheckpoint, "map", failing(SafetensorsCheckpoint.map))


def test_restore_after_a1111_loaded_another_checkpoint_is_refused(webui, merged):
    b_info = webui.sd_models.checkpoint_aliases["b.safetensors"]
    webui.sd_models.reload_model_weights(info=b_info)  # the user picked b in the top dropdown
    b_now = _snapshot(webui.model)
    with pytest.raises(MergeError, match="loaded a checkpoint since this merge"):
        merged.session.restore()
    assert _equal(live_tensors(webui.model), b_now) == []
    assert merged.host.live_model().source == Path(b_info.filename)


def test_a_reload_is_noticed_without_the_model_loaded_callback(webui, tmp_path):
    host = _host(webui, tmp_path)
    live = host.live_model()
    webui.script_callbacks.callback_map["callbacks_model_loaded"].clear()
    webui.sd_models.reload_model_weights(info=webui.sd_models.checkpoint_aliases["c.safetensors"])
    with pytest.raises(MergeError, match="loaded a checkpoint since"):
        live.tensors()
    assert host.live_model() is not live


def test_live_model_is_one_object_while_the_checkpoint_stays(webui, tmp_path):
    host = _host(webui, tmp_path)
    assert host.live_model() is host.live_model()
    assert host.live_model().source == _source(webui)


def test_forge_model_is_left_alone_and_the_merge_can_be_saved(webui, tmp_path, caplog):
    host = _host(webui, tmp_path)
    webui.model.forge_objects = object()
    before = _snapshot(webui.model)
    session = MergeSession(host)
    outcome = session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors"))
    assert not outcome.swapped and "Forge's model object is not supported yet" in caplog.text
    assert _equal(live_tensors(webui.model), before) == []
    assert session.save("forge_merge").exists()


def test_undo_lora_restores_multihead_attention_backups():
    attention = torch.nn.MultiheadAttention(4, 2)
    original = [attention.in_proj_weight.detach().clone(), attention.out_proj.weight.detach().clone(),
                attention.out_proj.bias.detach().clone()]
    attention.network_weights_backup = (original[0].clone(), original[1].clone())
    attention.network_bias_backup = original[2].clone()
    attention.network_current_names = (("detail", 1.0, 1.0, None),)
    with torch.no_grad():
        for tensor in (attention.in_proj_weight, attention.out_proj.weight, attention.out_proj.bias):
            tensor.add_(1)
        assert undo_lora(attention)
    assert all(torch.equal(x, y) for x, y in zip(
        [attention.in_proj_weight, attention.out_proj.weight, attention.out_proj.bias], original))
    assert (attention.network_weights_backup, attention.network_current_names) == (None, ())
    assert not undo_lora(attention)


def test_undo_lora_drops_a_bias_the_lora_added():
    layer = torch.nn.Linear(3, 2, bias=False)
    layer.network_weights_backup = layer.weight.detach().clone()
    layer.network_bias_backup = None  # A1111: the layer had no bias when it was backed up
    layer.network_current_names = (("detail", 1.0, 1.0, None),)
    layer.bias = torch.nn.Parameter(torch.ones(2))
    undo_lora(layer)
    assert layer.bias is None


# --- txt2img defaults ---------------------------------------------------------------------------


def test_default_generation_reads_the_txt2img_defaults_from_ui_config(webui, tmp_path, caplog):
    config = {"txt2img/Prompt/value": "masterpiece", "customscript/sampler.py/txt2img/Sampling steps/value": 28,
              "customscript/sampler.py/txt2img/Sampling method/value": "Euler", "txt2img/CFG Scale/value": 5,
              "txt2img/Width/value": "wide", "customscript/seed.py/txt2img/Seed/value": 7}
    Path(webui.shared.cmd_opts.ui_config_file).write_text(json.dumps(config), encoding="utf-8")
    params = _host(webui, tmp_path).default_generation()
    assert (params.prompt, params.steps, params.sampler, params.cfg_scale, params.seed) == (
        "masterpiece", 28, "Euler", 5.0, 7)
    assert params.width == GenerationParams().width and "ignoring txt2img/Width/value" in caplog.text


def test_default_generation_without_ui_config_is_ours(webui, tmp_path):
    assert _host(webui, tmp_path).default_generation() == GenerationParams()


# --- install.py ---------------------------------------------------------------------------------


def _install_module():
    spec = importlib.util.spec_from_file_location("supermerger_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_runs_pip_only_for_missing_packages():
    install = _install_module()
    calls = []
    launch = SimpleNamespace(is_installed=lambda name: name != "tqdm",
                             run_pip=lambda command, desc=None: calls.append((command, desc)))
    assert install.install(launch) == ["tqdm>=4.60"]
    assert calls == [('install "tqdm>=4.60"', "tqdm>=4.60 for SuperMerger")]
    calls.clear()
    launch.is_installed = lambda name: True
    assert install.install(launch) == [] and calls == []


def test_install_never_touches_torch_or_gradio_and_follows_requirements():
    install = _install_module()
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    # gradio and its web stack (huggingface_hub, starlette, fastapi pins) come with the web UI, as torch does
    web_ui_owns = r"(torch|gradio|huggingface_hub|starlette|fastapi)\b"
    ours = {line for line in lines if line and not re.match(web_ui_owns, line)}
    assert set(install.REQUIREMENTS.values()) == ours


def test_install_warns_of_a_torch_without_fp8_and_never_installs_one():
    install = _install_module()
    assert [install.torch_too_old(v) for v in ("2.0.1+cu118", "1.13.1", "2.1.2+cu121", "2.13.0", "3.0")] == [
        True, True, False, False, False]
    assert "torch 2.0.1+cu118" in install.torch_warning("2.0.1+cu118") and "2.1 or newer" in install.torch_warning("2.0")
    assert install.torch_warning("2.1.2") == ""


def test_install_script_runs_as_a1111_runs_it(webui):
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    assert webui.launch.pip_calls == []  # everything is installed here


def test_a_text_encoder_only_merge_changes_the_image(webui, tmp_path):
    """A1111 caches the prompt's conditioning per checkpoint: without a reset the image would not change."""
    session = MergeSession(_host(webui, tmp_path))
    before = session.generate(PARAMS)
    recipe = Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.5,
                    include_exclude="include", include_exclude_elements="cond_stage_model")
    outcome = session.merge(recipe)
    assert 0 < outcome.merged_keys < 300  # the text encoder only
    assert not _same_images(session.generate(PARAMS), before)


def test_a_vae_chosen_in_settings_is_left_alone_by_merge_and_restore(webui, tmp_path):
    """Settings → SD VAE loads a file over the checkpoint's VAE (A1111 sets ``loaded_vae_file``): a merge
    must not overwrite it, and a restore must not read the checkpoint's VAE back over it (seen in A1111 1.10.1)."""
    webui.model.loaded_vae_file = str(tmp_path / "ext.safetensors")
    vae = {k: t.clone() for k, t in live_tensors(webui.model).items() if k.startswith("first_stage_model.")}
    for tensor in vae.values():  # "the external VAE": different from both checkpoints
        tensor.add_(0.5)
    for key, tensor in live_tensors(webui.model).items():
        if key in vae:
            tensor.data.copy_(vae[key])
    session = MergeSession(_host(webui, tmp_path))
    session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.5))
    after = live_tensors(webui.model)
    assert vae and all(torch.equal(after[k], vae[k]) for k in vae)
    session.restore()
    after = live_tensors(webui.model)
    assert all(torch.equal(after[k], vae[k]) for k in vae)


def test_picking_a_vae_after_a_merge_keeps_the_merge_restorable(webui, tmp_path):
    """A1111's sd_vae.reload_vae_weights calls the model-loaded callbacks with the same model: that is
    no new checkpoint. Restore must still work, and must leave the VAE the user picked alone."""
    host = _host(webui, tmp_path)
    session = MergeSession(host)
    original = _snapshot(webui.model)
    session.merge(Recipe(model_a="b.safetensors", model_b="c.safetensors", alpha=0.5))
    live = live_tensors(webui.model)
    picked = {k: t + 0.5 for k, t in original.items() if k.startswith("first_stage_model.")}
    for key, tensor in picked.items():  # what sd_vae.load_vae does, then the callback it runs
        live[key].data.copy_(tensor)
    webui.model.loaded_vae_file = str(tmp_path / "picked.vae.safetensors")
    webui.script_callbacks.model_loaded_callback(webui.model)
    assert session.restore() > 0
    live = live_tensors(webui.model)
    assert _equal(live, original, skip=picked) == []
    assert all(torch.equal(live[k], picked[k]) for k in picked)



@needs_extension_link
def test_a1111s_own_images_name_the_merge_swapped_in(webui):
    webui.scripts.load_scripts()
    (_, module), = webui.scripts.scripts_data
    script = module.MergeInfotext()
    assert script.show(False) is webui.scripts.AlwaysVisible
    p = SimpleNamespace(extra_generation_params={})
    script.process(p)
    assert p.extra_generation_params == {}  # nothing merged: nothing said
    outcome = module.session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
    script.process(p)
    assert p.extra_generation_params["SuperMerger"] == outcome.name
    assert p.extra_generation_params["SuperMerger ID"] == outcome.history_id
    assert Recipe.from_json(p.extra_generation_params["SuperMerger recipe"]) == outcome.recipe
    module.session.restore()
    p = SimpleNamespace(extra_generation_params={})
    script.process(p)
    assert p.extra_generation_params == {}


@needs_extension_link
def test_a_merge_stays_restorable_after_reload_ui(webui):
    """Reload UI clears A1111's callbacks and runs the extension's script again."""
    original = _snapshot(webui.model)
    webui.scripts.load_scripts()
    (_, first), = webui.scripts.scripts_data
    first.session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.5))
    webui.script_callbacks.clear_callbacks()
    webui.scripts.load_scripts()
    (_, second), = webui.scripts.scripts_data
    assert second is not first and second.session is first.session
    callbacks = webui.script_callbacks.callback_map["callbacks_model_loaded"]
    assert [c.callback for c in callbacks] == [second.host.model_loaded]
    assert second.session.restore() > 0
    assert _equal(live_tensors(webui.model), original) == []


# --- a stack: the merge, then the LoRA tab's LoRAs (issue 24) -------------------------------------


@needs_gradio
def test_a_tab_lora_goes_on_top_of_the_merge_swapped_in(webui, merged, tmp_path):
    """Merge, then the LoRA tab's "Apply to loaded model": the model is the saved merge with the LoRA baked
    in (not A + LoRA), and the message, the state and the infotext say both; Restore gives the file back."""
    from mergers.lora.apply import loras_to_checkpoint
    from mergers.lora.blocks import parse_entries
    from mergers.ui import lora_tab
    from mergers.ui.handlers import MESSAGE
    from tests.test_lora_fixtures import make_lora

    folder = tmp_path / "Lora"
    folder.mkdir()
    make_lora(folder / "style.safetensors", "sd1", rank=2, seed=1)  # U-Net and text encoder, convs too
    actions = lora_tab.LoraActions(merged.session)
    message = actions.apply_to_loaded({lora_tab.FOLDER: str(folder), lora_tab.ENTRIES: "style:0.7"})[MESSAGE]
    baked = tmp_path / "merge+style.safetensors"
    loras_to_checkpoint(merged.expected, parse_entries("style:0.7"), baked, resolve=lambda n: folder / f"{n}.safetensors")
    live = live_tensors(webui.model)
    assert _equal(live, _file_tensors(baked, live)) == []
    assert f"it now holds {merged.outcome.name}, then LoRA style:0.7" in message
    state = merged.session.state()
    assert state["name"] == f"{merged.outcome.name}, then LoRA style:0.7"
    assert [(part["kind"], part["name"]) for part in state["stack"]] == [("merge", merged.outcome.name),
                                                                        ("lora", "style:0.7")]
    merged.session.generate(PARAMS)
    p, _ = webui.processing.processed_log[-1]
    assert p.extra_generation_params["SuperMerger LoRA"] == "style:0.7"
    assert p.extra_generation_params["SuperMerger ID"] == merged.outcome.history_id
    # Applying again replaces the tab's LoRA: the merge under it stays.
    actions.apply_to_loaded({lora_tab.FOLDER: str(folder), lora_tab.ENTRIES: "style:0.2"})
    loras_to_checkpoint(merged.expected, parse_entries("style:0.2"), baked, overwrite=True,
                        resolve=lambda n: folder / f"{n}.safetensors")
    live = live_tensors(webui.model)
    assert _equal(live, _file_tensors(baked, live)) == []
    assert "checkpoint file again" in actions.restore({})[MESSAGE]
    live = live_tensors(webui.model)
    assert _equal(live, _file_tensors(_source(webui), live)) == []
    assert merged.session.state()["stack"] == []


@needs_gradio
def test_a_new_merge_takes_the_tab_lora_out_and_says_so(webui, merged, tmp_path):
    from mergers.ui import lora_tab
    from tests.test_lora_fixtures import make_lora

    make_lora(tmp_path / "style.safetensors", "sd1", rank=2, seed=1, only="attentions_0")
    lora_tab.LoraActions(merged.session).apply_to_loaded({lora_tab.FOLDER: str(tmp_path), lora_tab.ENTRIES: "style:1"})
    outcome = merged.session.merge(Recipe(model_a="a.safetensors", model_b="c.safetensors", alpha=0.5))
    assert any("LoRA style:1 came out of the model" in warning for warning in outcome.warnings)
    expected = tmp_path / "ac.safetensors"
    merge_to_file(outcome.recipe, expected, resolve=merged.host.resolve)
    live = live_tensors(webui.model)
    assert _equal(live, _file_tensors(expected, live)) == []
    assert [part["kind"] for part in merged.session.state()["stack"]] == ["merge"]


# --- FP8 weight storage with "Cache FP16 weight for LoRA" (issue 24) -------------------------------


def _select_lora(webui: SimpleNamespace, model: torch.nn.Module) -> None:
    """The fixture's prompt LoRA, selected for ``model`` (A1111 names the layers of each model it loads)."""
    webui.networks.assign_network_names_to_compvis_modules(model)
    layers = model.network_layer_mapping
    deltas = {name: torch.full(layers[name].weight.shape, 0.25, dtype=torch.float16) for name in (TE_LAYER, UNET_LAYER)}
    webui.networks.loaded_networks[:] = [webui.networks.Network("detail", {k: webui.networks.NetworkModule(v)
                                                                           for k, v in deltas.items()})]


def _fresh_load(webui: SimpleNamespace, path: Path) -> tuple[dict[str, torch.Tensor], dict, list]:
    """A1111 loading ``path`` from scratch, the prompt LoRA on, one generation: its weights, fp16 copies, images."""
    model = webui.sd_models.load_model(webui.sd_models.CheckpointInfo(str(path)))
    _select_lora(webui, model)
    images = _generate(webui)
    return _snapshot(model), _fp16_copies(model), images


def _generate(webui: SimpleNamespace) -> list[np.ndarray]:
    p = webui.processing.StableDiffusionProcessingTxt2Img(prompt=PARAMS.prompt, seed=PARAMS.seed, steps=PARAMS.steps,
                                                          width=PARAMS.width, height=PARAMS.height)
    return _pixels(webui.processing.process_images(p))


def _fp16_copies(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from mergers.hosts.a1111 import fp16_copy_slots

    return {key: getattr(module, name).clone() for key, (module, name) in fp16_copy_slots(model).items()}


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key for key in left.keys() | right.keys() if key not in left or key not in right
                  or not torch.equal(left[key], right[key]))


def test_fp8_storage_with_the_fp16_cache_gives_a_fresh_loads_lora_after_swap_and_restore(webui, tmp_path):
    """A1111 fills ``fp16_weight``/``fp16_bias`` from the full-precision weights and adds prompt LoRAs to those;
    after a swap and after Restore they must hold the merged/restored values, not the fp8-rounded ones."""
    webui.shared.opts.fp8_storage, webui.shared.opts.cache_fp16_weight = "Enable", True
    source = _source(webui)
    model = webui.sd_models.load_model(webui.sd_models.CheckpointInfo(str(source)))
    slots = _fp16_copies(model)
    assert slots and live_tensors(model)[UNET_KEY + ".weight"].dtype == torch.float8_e4m3fn
    assert TE_KEY + ".bias" in slots and "first_stage_model.decoder.conv_out.weight" not in slots  # not the VAE
    _select_lora(webui, model)
    _generate(webui)  # the LoRA is patched in, its fp8 backups beside it
    host = _host(webui, tmp_path)
    session = MergeSession(host)
    outcome = session.merge(Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3))
    expected = tmp_path / "expected.safetensors"
    merge_to_file(outcome.recipe, expected, resolve=host.resolve)
    swapped_images = _generate(webui)
    swapped = (_snapshot(model), _fp16_copies(model))
    lora_keys = {UNET_KEY + ".weight", TE_KEY + ".weight"}
    assert any(not torch.equal(copy, swapped[0][key].half())  # finer than fp8
               for key, copy in swapped[1].items() if key not in lora_keys)
    session.restore()
    restored_images = _generate(webui)
    restored = (_snapshot(model), _fp16_copies(model))

    weights, copies, images = _fresh_load(webui, expected)
    assert _same(swapped[1], copies) == [] and _same(swapped[0], weights) == []
    assert all(np.array_equal(x, y) for x, y in zip(swapped_images, images, strict=True))
    weights, copies, images = _fresh_load(webui, source)
    assert _same(restored[1], copies) == [] and _same(restored[0], weights) == []
    assert all(np.array_equal(x, y) for x, y in zip(restored_images, images, strict=True))
