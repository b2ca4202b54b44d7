"""The Forge host (mergers/hosts/forge.py) against the Forge stand-in (tests/forge_stub).

The stand-in is put on ``sys.path`` by the ``forge`` fixture only, over a fresh data folder with
real-layout SD1, SDXL and Flux checkpoints (every key of a real one, small shapes). Its loader
converts a checkpoint as Forge's does and loads every weight under ``torch.inference_mode()``;
its LoRA loader replaces LoRA'd parameters and keeps the originals in ``lora_loader.backup``.
"Forge's own load" of a file below is the stand-in's ``forge_loader``, so "the same bits as Forge's
load" means: a swapped merge equals the merged file loaded by Forge, parameter for parameter.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mergers.arch import key_specs
from mergers.checkpoint import open_checkpoint
from mergers.demo import tiny_state_dict
from mergers.errors import MergeError
from mergers.host import GenerationParams
from mergers.hosts.a1111 import A1111Modules, session_for
from mergers.hosts.forge import (A1111, FORGE, REFORGE, ForgeHost, ForgeTensors, installed_webui, model_webui,
                                 module_part)
from mergers.hosts.forge_keys import CLIP, SPLIT, TRANSPOSE, forge_target, skipped
from mergers.merge import merge_to_file
from mergers.recipe import Recipe
from mergers.session import MergeSession
from mergers.writer import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "forge_stub"
STUB_TOP_LEVEL = {"networks", "launch", "supermerger.py", "backend", "modules_forge"}
FAMILIES = ("sd1", "sdxl", "flux")
PARAMS = GenerationParams(prompt="a cat", negative_prompt="blurry", steps=4, sampler="Euler", cfg_scale=5.0,
                          width=32, height=24, seed=77, batch_size=1)
# One LoRA'd layer in the U-Net and one in the text encoder, by the patchers' names.
LORA_KEYS = {"sd1": ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                     "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
             "sdxl": ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                      "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
             "flux": ("diffusion_model.double_blocks.0.img_attn.qkv.weight",
                      "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")}


def _forget_stub_modules() -> None:
    for name in list(sys.modules):
        top = name.split(".")[0]
        if top in ("modules", "backend", "modules_forge") or name in STUB_TOP_LEVEL:
            del sys.modules[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, list[Path]]:
    """Per family, two checkpoints with every key of a real one (optional keys too), fp16."""
    folder = tmp_path_factory.mktemp("forge_checkpoints")
    files = {}
    for family in FAMILIES:
        files[family] = []
        for seed, name in enumerate("ab"):
            path = folder / f"{family}_{name}.safetensors"
            save_checkpoint(path, tiny_state_dict(family, seed=seed, optional=True))
            files[family].append(path)
    return files


def _start(tmp_path, monkeypatch, checkpoints, family="sd1", **loading) -> SimpleNamespace:
    data = tmp_path / "forge"
    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    (data / "extensions" / "supermerger").mkdir(parents=True)
    for part in ("scripts", "mergers"):
        (data / "extensions" / "supermerger" / part).symlink_to(ROOT / part)
    for path in checkpoints[family]:
        shutil.copyfile(path, models / path.name.replace(f"{family}_", ""))
    monkeypatch.setenv("A1111_STUB_DATA_DIR", str(data))
    monkeypatch.syspath_prepend(str(STUB))
    _forget_stub_modules()
    import networks
    from backend import loader, memory_management
    from modules import call_queue, devices, paths, processing, script_callbacks, scripts, sd_models, shared

    sd_models.list_models()
    forge = SimpleNamespace(shared=shared, sd_models=sd_models, processing=processing, call_queue=call_queue,
                            paths=paths, devices=devices, script_callbacks=script_callbacks, scripts=scripts,
                            networks=networks, loader=loader, memory_management=memory_management, data=data,
                            models=models, family=family)
    _load(forge, "a.safetensors", **loading)
    return forge


def _load(forge, name, **loading):
    """Pick a checkpoint (and modules / storage) as Forge's UI does; Forge loads it before the next batch."""
    info = forge.sd_models.checkpoint_aliases[name]
    forge.sd_models.model_target(info, **loading)
    forge.sd_models.forge_model_reload()


@pytest.fixture(params=FAMILIES)
def forge(request, tmp_path, monkeypatch, checkpoints):
    try:
        yield _start(tmp_path, monkeypatch, checkpoints, request.param)
    finally:
        _forget_stub_modules()


@pytest.fixture
def forge_sd1(tmp_path, monkeypatch, checkpoints):
    try:
        yield _start(tmp_path, monkeypatch, checkpoints, "sd1")
    finally:
        _forget_stub_modules()


def _host(forge, tmp_path) -> ForgeHost:
    modules = A1111Modules(forge.shared, forge.sd_models, forge.processing, forge.call_queue, forge.paths,
                           forge.devices)
    host = ForgeHost(modules, extension_dir=tmp_path / "extension")
    forge.script_callbacks.on_model_loaded(host.model_loaded)
    return host


def _model(forge):
    return forge.sd_models.model_data.sd_model


def _roots(model) -> dict[str, torch.nn.Module]:
    objects = model.forge_objects
    return {"unet": objects.unet.model, "clip": objects.clip.patcher.model, "vae": objects.vae.patcher.model}


def _weights(model) -> dict[str, torch.Tensor]:
    """Every live parameter and buffer by "part/name", cloned (Forge's names, not the checkpoint's)."""
    with torch.inference_mode():
        return {f"{part}/{name}": tensor.detach().clone() for part, root in _roots(model).items()
                for name, tensor in root.state_dict(keep_vars=True).items()}


def _forge_load(forge, path: Path, **loading):
    """The model Forge's own loader builds from ``path`` (the reference for "same bits")."""
    from backend.args import dynamic_args

    dynamic_args["forge_unet_storage_dtype"] = loading.get("unet_storage_dtype")
    try:
        return forge.loader.forge_loader(str(path), additional_state_dicts=loading.get("additional_modules", []))
    finally:
        dynamic_args["forge_unet_storage_dtype"] = None


def _differing(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> list[str]:
    assert left.keys() == right.keys()
    return [name for name in left if not torch.equal(left[name], right[name])]


def _select_lora(forge, family, strength=0.25) -> None:
    """A LoRA in the prompt: the built-in extension patches the U-Net and text encoder at the next batch."""
    unet_key, clip_key = LORA_KEYS[family]
    with torch.inference_mode():
        roots = _roots(_model(forge))
        deltas = {part: {key: torch.full_like(roots[part].get_parameter(key), strength, dtype=torch.float32)}
                  for part, key in (("unet", unet_key), ("clip", clip_key))}
    forge.networks.available["detail"] = deltas
    forge.networks.selected[:] = ["detail"]


def _pixels(generated) -> list[np.ndarray]:
    return [np.asarray(image) for image in generated.images]


def _same_images(left, right) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_pixels(left), _pixels(right), strict=True))


RECIPE = Recipe(model_a="a.safetensors", model_b="b.safetensors", alpha=0.3)


# --- which web UI -----------------------------------------------------------------------------


def test_web_uis_are_told_apart_by_model_and_by_packages(forge_sd1):
    class LatentDiffusion(torch.nn.Module):
        pass

    a1111 = LatentDiffusion()
    reforge = LatentDiffusion()
    reforge.forge_objects = object()  # reForge / Classic: A1111's object with forge_objects added
    assert [model_webui(m) for m in (_model(forge_sd1), reforge, a1111)] == [FORGE, REFORGE, A1111]
    packages = {"forge": {"modules_forge", "backend"}, "reforge": {"modules_forge", "ldm_patched"}, "a1111": set()}
    assert [installed_webui(lambda name, found=found: name in found) for found in packages.values()] == \
        [FORGE, REFORGE, A1111]
    assert installed_webui() == FORGE  # the stand-in is on sys.path


# --- the key table against real key lists ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_real_key_maps_to_exactly_one_live_target(family, tmp_path, monkeypatch, checkpoints):
    """Every key of a real checkpoint (key_specs: shared/arch) is either one Forge does not load as a weight, or
    reaches live tensors that exist, in the file's shape once transformed; no live tensor is reached twice,
    and every weight Forge loaded from the file is reached."""
    try:
        forge = _start(tmp_path, monkeypatch, checkpoints, family)
        model = _model(forge)
        roots = _roots(model)
        tensors = ForgeTensors(roots, [spec.key for spec in key_specs(family)])
        reached: dict[tuple[str, str], str] = {}
        with open_checkpoint(model.filename) as ckpt:
            shapes = ckpt.shapes
        for spec in key_specs(family):
            if skipped(spec.key):
                assert spec.key not in tensors
                continue
            target = tensors[spec.key]  # KeyError: a real key with no live target
            assert tuple(target.shape) == tuple(shapes[spec.key]), spec.key
            for name in target.spec.names:
                assert (target.spec.part, name) not in reached, (spec.key, reached.get((target.spec.part, name)))
                reached[(target.spec.part, name)] = spec.key
        live = {(part, name) for part, root in roots.items() for name, _ in root.named_parameters()}
        assert live - set(reached) <= {("clip", "clip_l.logit_scale")}  # IntegratedCLIP's own, in no SD1/Flux file
        if family == "sdxl":
            split = [k for k in tensors if tensors[k].spec.transform == SPLIT]
            assert len(split) == 64 and all(len(tensors[k].spec.names) == 3 for k in split)  # 32 layers × weight, bias
            assert [k for k in tensors if tensors[k].spec.transform == TRANSPOSE] == \
                ["conditioner.embedders.1.model.text_projection"]
    finally:
        _forget_stub_modules()


def test_key_table_spellings():
    assert forge_target("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight").names == \
        ("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",)  # old SD1 spelling
    assert forge_target("double_blocks.0.img_attn.qkv.weight").names == \
        ("diffusion_model.double_blocks.0.img_attn.qkv.weight",)  # a bare Flux transformer
    qkv = forge_target("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias")
    assert qkv.part == CLIP and qkv.transform == SPLIT and [n.split(".")[-2] for n in qkv.names] == \
        ["q_proj", "k_proj", "v_proj"]
    assert forge_target("alphas_cumprod") is None and forge_target("model_ema.decay") is None


# --- merge, LoRA, restore ---------------------------------------------------------------------


def test_merge_writes_what_forge_would_load_from_the_merged_file(forge, tmp_path):
    host = _host(forge, tmp_path)
    session = MergeSession(host)
    model = _model(forge)
    outcome = session.merge(RECIPE)
    assert outcome.swapped, outcome.summary
    merged = tmp_path / "merged.safetensors"
    merge_to_file(RECIPE, merged, resolve=host.resolve)
    assert _differing(_weights(model), _weights(_forge_load(forge, merged))) == []
    assert forge.sd_models.model_data.sd_model is model  # in place: no reload


def test_merge_in_fp8_storage_takes_the_same_bits_as_forges_load(tmp_path, monkeypatch, checkpoints):
    try:
        forge = _start(tmp_path, monkeypatch, checkpoints, "sd1", unet_storage_dtype=torch.float8_e4m3fn)
        host = _host(forge, tmp_path)
        assert MergeSession(host).merge(RECIPE).swapped
        merged = tmp_path / "merged.safetensors"
        merge_to_file(RECIPE, merged, resolve=host.resolve)
        expected = _weights(_forge_load(forge, merged, unet_storage_dtype=torch.float8_e4m3fn))
        live = _weights(_model(forge))
        assert live["unet/diffusion_model.out.2.weight"].dtype == torch.float8_e4m3fn
        assert _differing(_bits(live), _bits(expected)) == []
    finally:
        _forget_stub_modules()


def _bits(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp8 tensors as their bytes (torch.equal does not compare fp8 on the CPU)."""
    return {k: t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t
            for k, t in tensors.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_stays_applied_over_a_merge_and_restore_gives_back_the_base(family, tmp_path, monkeypatch,
                                                                           checkpoints):
    try:
        forge = _start(tmp_path, monkeypatch, checkpoints, family)
        host = _host(forge, tmp_path)
        session = MergeSession(host)
        model = _model(forge)
        base = _weights(model)
        plain = session.generate(PARAMS)
        _select_lora(forge, family)
        with_lora = session.generate(PARAMS)  # Forge patches the LoRA in while it loads the patchers
        lora_base = _weights(model)
        assert not _same_images(plain, with_lora) and _differing(lora_base, base) != []

        session.merge(RECIPE)
        merged_with_lora = session.generate(PARAMS)
        merged = tmp_path / "merged.safetensors"
        merge_to_file(RECIPE, merged, resolve=host.resolve)
        # The merged file loaded by Forge with the same LoRA applied: the same bits.
        assert _differing(_weights(model), _weights(_with_lora(forge, _forge_load(forge, merged)))) == []
        assert not _same_images(merged_with_lora, with_lora)
        cache = forge.processing.StableDiffusionProcessing.cached_c
        assert len(cache) == 3 and cache[1] == forge.processing._digest(model.forge_objects.clip.cond_stage_model)

        assert session.restore() > 0
        assert _differing(_weights(model), lora_base) == []  # the LoRA again, on the checkpoint's own weights
        assert _same_images(session.generate(PARAMS), with_lora)
        forge.networks.selected[:] = []
        assert _same_images(session.generate(PARAMS), plain)
        assert _differing(_weights(model), base) == []  # bit for bit
    finally:
        _forget_stub_modules()


def _with_lora(forge, model):
    """``model`` with the selected LoRA applied by its own patchers, as Forge's LoRA extension would."""
    lora = forge.networks.available["detail"]
    unet, clip = model.forge_objects.unet.clone(), model.forge_objects.clip.clone()
    unet.add_patches(filename="detail", patches={k: ("diff", (v,)) for k, v in lora["unet"].items()})
    clip.add_patches(filename="detail", patches={k: ("diff", (v,)) for k, v in lora["clip"].items()})
    unet.refresh_loras()
    clip.patcher.refresh_loras()
    return model


def test_a_write_outside_inference_mode_is_caught(forge_sd1, tmp_path):
    """Forge's weights are inference tensors: an in-place write under no_grad fails; the host's writes work."""
    model = _model(forge_sd1)
    weight = model.forge_objects.unet.model.diffusion_model.get_submodule("out.2").weight
    assert weight.is_inference()
    with pytest.raises(RuntimeError, match="[Ii]nference"), torch.no_grad():
        weight.copy_(torch.zeros_like(weight))
    assert MergeSession(_host(forge_sd1, tmp_path)).merge(RECIPE).swapped


def test_parameters_are_looked_up_by_name_at_each_write(forge_sd1, tmp_path):
    """Forge's LoRA loader binds new parameter objects: the host never keeps one between uses."""
    host = _host(forge_sd1, tmp_path)
    tensors = host.live_model().tensors()
    key = "model.diffusion_model.out.2.weight"
    target = tensors[key]
    diffusion = _model(forge_sd1).forge_objects.unet.model.diffusion_model
    with torch.inference_mode():
        layer = diffusion.get_submodule("out.2")
        replacement = torch.nn.Parameter(layer.weight.clone(), requires_grad=False)
        layer.weight = replacement
        target.copy_(torch.ones(target.shape))
    assert torch.equal(replacement, torch.ones_like(replacement))


# --- what cannot be written in place ----------------------------------------------------------


@pytest.mark.parametrize("storage, named", [("nf4", "NF4"), ("gguf", "GGUF")])
def test_quantized_models_are_refused_with_save_offered(storage, named, tmp_path, monkeypatch, checkpoints):
    try:
        forge = _start(tmp_path, monkeypatch, checkpoints, "sd1", unet_storage_dtype=storage)
        session = MergeSession(_host(forge, tmp_path))
        before = _weights(_model(forge))
        outcome = session.merge(RECIPE)
        assert not outcome.swapped
        assert named in outcome.summary and "Save" in outcome.summary, outcome.summary
        assert _differing(_weights(_model(forge)), before) == []
        assert session.save("ab").exists()
    finally:
        _forget_stub_modules()


def test_scaled_fp8_layers_are_refused_by_name(forge_sd1, tmp_path):
    layer = _model(forge_sd1).forge_objects.unet.model.diffusion_model.get_submodule("out.2")
    with torch.inference_mode():
        layer.register_buffer("scale_weight", torch.tensor(0.5))
    host = _host(forge_sd1, tmp_path)
    outcome = MergeSession(host).merge(RECIPE)
    assert not outcome.swapped and "diffusion_model.out.2" in outcome.summary and "scale_weight" in outcome.summary


def test_reforge_is_refused_naming_it(forge_sd1, tmp_path):
    class LatentDiffusion(torch.nn.Module):
        pass

    reforge = LatentDiffusion()
    reforge.forge_objects = object()
    forge_sd1.sd_models.model_data.sd_model = reforge
    host = _host(forge_sd1, tmp_path)
    assert host.live_model() is None and "reForge" in host.no_swap_reason()


# --- Forge's loading and the web UI around the swap -------------------------------------------


def test_a_vae_loaded_from_its_own_file_is_left_alone(tmp_path, monkeypatch, checkpoints):
    vae_file = tmp_path / "my.vae.safetensors"
    state = tiny_state_dict("sd1", seed=9)
    save_checkpoint(vae_file, {k[len("first_stage_model."):]: v for k, v in state.items()
                               if k.startswith("first_stage_model.")})
    assert module_part({"decoder.conv_in.weight": (4, 4, 3, 3)}) == ("vae", "")
    try:
        forge = _start(tmp_path, monkeypatch, checkpoints, "sd1", additional_modules=[str(vae_file)])
        session = MergeSession(_host(forge, tmp_path))
        model = _model(forge)
        vae = {k: v for k, v in _weights(model).items() if k.startswith("vae/")}
        session.merge(RECIPE)
        after = _weights(model)
        assert _differing({k: after[k] for k in vae}, vae) == []
        original = _weights(_forge_load(forge, forge.models / "a.safetensors", additional_modules=[str(vae_file)]))
        assert [k for k in _differing(after, original) if not k.startswith("unet/") and not k.startswith("clip/")] == []
        assert any(k.startswith("unet/") for k in _differing(after, original))  # the rest was merged
        session.restore()
        assert _differing({k: _weights(model)[k] for k in vae}, vae) == []
    finally:
        _forget_stub_modules()


def test_files_loaded_beside_the_checkpoint_are_told_apart():
    assert module_part({"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}) == ("clip", "t5xxl.")
    assert module_part({"text_model.encoder.layers.0.layer_norm1.bias": (768,)}) == ("clip", "clip_l.")
    assert module_part({"transformer.resblocks.0.ln_1.bias": (1280,)}) == ("clip", "clip_g.")
    assert module_part({"something.else": (3,)}) == ("clip", "")  # unknown: every text encoder left alone


def test_a_reload_ends_the_swap(forge_sd1, tmp_path):
    host = _host(forge_sd1, tmp_path)
    session = MergeSession(host)
    session.merge(RECIPE)
    _load(forge_sd1, "b.safetensors")  # the user picks another checkpoint: Forge builds a new model
    assert session.infotext() == {}
    with pytest.raises(MergeError, match="no longer in the loaded model"):
        session.restore()
    assert session.merge(RECIPE).swapped  # into the new model


def test_a_checkpoint_picked_but_not_loaded_yet_is_not_merged_into(forge_sd1, tmp_path):
    """Forge loads a newly picked checkpoint lazily, at the next generation: the model loaded until then is
    about to go, so a merge is not swapped into it (the outcome says why); after a generation it is."""
    session = MergeSession(_host(forge_sd1, tmp_path))
    old = _model(forge_sd1)
    before = _weights(old)
    forge_sd1.sd_models.model_target(forge_sd1.sd_models.checkpoint_aliases["b.safetensors"])
    outcome = session.merge(RECIPE)
    assert not outcome.swapped and "next generation" in outcome.summary
    assert _differing(_weights(old), before) == []
    session.generate(PARAMS)  # Forge loads b
    assert _model(forge_sd1) is not old and session.merge(RECIPE).swapped


def test_generate_names_the_merge_in_the_infotext(forge_sd1, tmp_path):
    session = MergeSession(_host(forge_sd1, tmp_path))
    before = session.generate(PARAMS)
    outcome = session.merge(RECIPE)
    generated = session.generate(PARAMS)
    assert f"SuperMerger: {outcome.name}" in generated.infotext.replace('"', "")
    assert not _same_images(before, generated)
    assert forge_sd1.processing.processed_log[-1][1] == "supermerger"


def test_the_glue_uses_the_forge_host_on_forge(forge_sd1):
    forge_sd1.scripts.load_scripts()
    (_, module), = forge_sd1.scripts.scripts_data
    assert isinstance(module.host, ForgeHost)
    assert module.host.live_model() is not None
    callbacks = forge_sd1.script_callbacks.callback_map
    assert [c.callback for c in callbacks["callbacks_model_loaded"]] == [module.host.model_loaded]


def test_session_for_keeps_one_session_per_host_class(forge_sd1, tmp_path):
    modules = A1111Modules(forge_sd1.shared, forge_sd1.sd_models, forge_sd1.processing, forge_sd1.call_queue,
                           forge_sd1.paths, forge_sd1.devices)
    first = session_for(modules, extension_dir=tmp_path, host_class=ForgeHost)
    assert session_for(modules, extension_dir=tmp_path, host_class=ForgeHost) is first
    assert isinstance(first.host, ForgeHost)

