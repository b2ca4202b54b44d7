"""``python -m mergers selftest``: every merge path run on a device and compared with the CPU's results.

Small models with the real key names (``mergers.demo.tiny_state_dict``) are written to a temp folder;
each check runs once on the CPU (the reference) and once on the chosen device, and the two results are
compared key by key. What a user attaches to a bug report: a table (check, device, difference, limit,
pass/fail) and a non-zero exit on any failure.

Limits, and why:
- elementwise methods in a fixed dtype: at most 1 ulp of the output dtype. Bit-equal unless a
  compiler contracts ``a + w·(b − a)`` into one fused multiply-add on one side (CUDA kernels, torch's
  Windows build): then results at rounding ties differ by one unit in the last place.
- methods with reductions (cosine similarities and their statistics, medians and quantiles, norms,
  angles, the geometric median's iterations): at most ``REDUCTION_RTOL`` of the key's largest value,
  as sums taken in another order round differently and the result feeds the formula again.
- LoRA extraction (SVD) and LoRA merging (re-factorisation): the factors are unique only up to sign
  and rotation, so the LoRA is applied to the base model and the *weights* compared, within
  ``SVD_RTOL`` of the largest value.
- swap + restore into a model held on the device: the merged values within the merge's own limit,
  and the restored weights bit-equal to the file (a restore copies the file's bytes).

Example:
    $ python -m mergers selftest --device cuda --quick
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mergers.demo import tiny_state_dict
from mergers.dice import Dice
from mergers.engine import resolve_device
from mergers.errors import MergeError
from mergers.fileio import ensure_utf8_console
from mergers.merge import merge_stream
from mergers.methods.modes import METHOD_TABLE, MODES, method_for
from mergers.recipe import Recipe
from mergers.swap import Swapper
from mergers.writer import save_checkpoint

REDUCTION_RTOL = 1e-3
SVD_RTOL = 2e-2
ARCHS = ("sd1", "sdxl", "flux")
MODEL_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
# Ratios that make every method do real work (no α = 0 or 1 short cuts).
RATIOS = {"alpha": 0.35, "beta": 0.45, "gamma": 0.3, "seed": 1234}
QUICK_CALCMODES = {"normal", "cosineA", "trainDifference", "smoothAdd", "extract"}
# Per layout: block weights (a preset where the layout has them, else the readable form), elemental
# entries in its block names, and whether the dice roll for it (SD1/SD2 and SDXL blocks only).
BLOCK_WEIGHTS = {"sd1": "GRAD_V", "sdxl": "GRAD_V", "flux": "ALL:0.3, D00-D09:0.8, S10-S20:0.6"}
ELEMENTAL = {"sd1": "M00:attn2:0.75\nOUT00-OUT02:NOT norm:1", "sdxl": "M00:attn2:0.75\nOUT00-OUT02:NOT norm:1",
             "flux": "D03:img_attn:0.7\nS05:linear1:0.2"}
DICE_ARCHS = {"sd1", "sdxl"}


@dataclass(frozen=True)
class Result:
    """One row of the table."""

    check: str
    device: str
    difference: str  # what was measured, e.g. "max 1 ulp (12 elements differ)"
    limit: str
    passed: bool
    seconds: float


@dataclass(frozen=True)
class Check:
    """A named computation run on the CPU and on the device, and how close the two must be."""

    name: str
    run: Callable[[str], Mapping[str, torch.Tensor]]  # device name → the tensors to compare
    limit: str  # "ulp" (≤ 1 ulp), "reduction" or "svd" (relative to the key's largest value), "exact"


class Models:
    """Tiny real-layout models of one architecture and dtype, written once into ``folder``."""

    def __init__(self, folder: Path, arch: str, dtype: torch.dtype):
        self.arch, self.dtype = arch, dtype
        name = f"{arch}_{str(dtype).removeprefix('torch.')}"
        self.paths = {}
        for role, seed in (("a", 1), ("b", 2), ("c", 3)):
            path = folder / f"{name}_{role}.safetensors"
            state = tiny_state_dict(arch, seed=seed)
            if role != "a":  # B and C close to A, as fine-tunes are: cosine and median paths see real signal
                base = tiny_state_dict(arch, seed=1)
                state = {k: (base[k].float() + 0.1 * v.float()).to(v.dtype) if v.is_floating_point() else v
                         for k, v in state.items()}
            save_checkpoint(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
            self.paths[role] = str(path)

    def recipe(self, mode: str, calcmode: str = "normal", **changes) -> Recipe:
        return Recipe(model_a=self.paths["a"], model_b=self.paths["b"], model_c=self.paths["c"], mode=mode,
                      calcmode=calcmode, **{**RATIOS, **changes})


def merged(recipe: Recipe, device: str) -> dict[str, torch.Tensor]:
    """Every merged key of ``recipe`` computed on ``device``, brought back to the CPU."""
    return {key: tensor.cpu() for key, tensor in merge_stream(recipe, device=device)}


def merge_checks(models: Models, *, quick: bool) -> list[Check]:
    """Every (mode, calculation mode) pair, then block weights, elemental, the dice and plus random."""
    checks = []
    for mode, calcmode in METHOD_TABLE:
        if quick and calcmode not in QUICK_CALCMODES:
            continue
        recipe = models.recipe(mode, calcmode)
        method = method_for(mode, calcmode)
        checks.append(Check(f"{MODES[mode]} / {calcmode}", _merge_run(recipe),
                            "ulp" if method.elementwise else "reduction"))
    extras = {
        f"block weights {BLOCK_WEIGHTS[models.arch]}": models.recipe("weight_sum",
                                                                   weights_alpha=BLOCK_WEIGHTS[models.arch]),
        "elemental": models.recipe("weight_sum", elemental=ELEMENTAL[models.arch]),
    }
    if models.arch in DICE_ARCHS:
        extras["dice (seeded)"] = models.recipe("weight_sum", dice=Dice(mode="U", seed=7))
    for name, recipe in extras.items():
        checks.append(Check(name, _merge_run(recipe), "ulp"))
    return checks


def _merge_run(recipe: Recipe) -> Callable[[str], Mapping[str, torch.Tensor]]:
    return lambda device: merged(recipe, device)


def lora_checks(models: Models, folder: Path) -> list[Check]:
    """Extract a LoRA (SVD), merge two LoRAs, bake a LoRA into the checkpoint: each compared as weights."""
    from mergers.lora.apply import loras_to_checkpoint
    from mergers.lora.blocks import parse_entry
    from mergers.lora.extract import extract_lora
    from mergers.lora.merge import merge_loras

    def weights(path: Path) -> dict[str, torch.Tensor]:
        from mergers.checkpoint import open_checkpoint

        with open_checkpoint(path) as ckpt:
            return {key: ckpt[key].clone() for key in ckpt}

    def extracted(device: str, name: str) -> Path:
        lora = folder / f"{name}_{device.replace(':', '')}.safetensors"
        extract_lora(models.paths["b"], models.paths["a"], lora, rank=4, device=device, overwrite=True)
        return lora

    @functools.cache
    def fixed() -> Path:  # the CPU's LoRA, made once, for the checks that test what comes after extraction
        return extracted("cpu", "fixed")

    def to_checkpoint(device: str) -> Mapping[str, torch.Tensor]:
        out = folder / f"baked_{device.replace(':', '')}.safetensors"
        loras_to_checkpoint(models.paths["a"], [parse_entry(f"{fixed()}:0.8")], out,
                            device=device, overwrite=True)
        return weights(out)

    def extract_then_bake(device: str) -> Mapping[str, torch.Tensor]:
        out = folder / f"extract_baked_{device.replace(':', '')}.safetensors"
        loras_to_checkpoint(models.paths["a"], [parse_entry(f"{extracted(device, 'extract')}:1")], out,
                            device="cpu", overwrite=True)
        return weights(out)

    def merge_then_bake(device: str) -> Mapping[str, torch.Tensor]:
        lora = fixed()
        merged_lora = folder / f"merged_lora_{device.replace(':', '')}.safetensors"
        merge_loras([parse_entry(f"{lora}:0.5"), parse_entry(f"{lora}:0.25")], merged_lora, rank=8, device=device,
                    overwrite=True)
        out = folder / f"merged_baked_{device.replace(':', '')}.safetensors"
        loras_to_checkpoint(models.paths["a"], [parse_entry(f"{merged_lora}:1")], out, device="cpu", overwrite=True)
        return weights(out)

    return [Check("LoRA to checkpoint", to_checkpoint, "ulp"),
            Check("LoRA extract (SVD), applied", extract_then_bake, "svd"),
            Check("LoRA merge (re-factorised), applied", merge_then_bake, "svd")]


class DeviceModel:
    """A loaded model stand-in: model A's tensors held on the device (``mergers.host.LiveModel``)."""

    def __init__(self, path: str, device: str):
        from mergers.checkpoint import open_checkpoint

        self.source = Path(path)
        with open_checkpoint(path) as ckpt:
            self._tensors = {key: ckpt[key].to(device) for key in ckpt}

    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self._tensors

    def before_change(self) -> None:
        pass

    def after_change(self, merged: bool) -> None:
        pass


def swap_checks(models: Models) -> list[Check]:
    """A merge swapped into a model on the device, then restored: merged values, then the file's bits."""
    recipe = models.recipe("weight_sum", weights_alpha=BLOCK_WEIGHTS[models.arch])

    def swapped(device: str) -> Mapping[str, torch.Tensor]:
        live = DeviceModel(models.paths["a"], device)
        Swapper(live).apply(merge_stream(recipe, device=device, output_device=device))
        return {key: tensor.cpu() for key, tensor in live.tensors().items()}

    def restored(device: str) -> Mapping[str, torch.Tensor]:
        live = DeviceModel(models.paths["a"], device)
        swapper = Swapper(live)
        swapper.apply(merge_stream(recipe, device=device, output_device=device))
        swapper.restore()
        return {key: tensor.cpu() for key, tensor in live.tensors().items()}

    return [Check("swap into the model on the device", swapped, "ulp"),
            Check("restore after the swap", restored, "exact")]


def compare(reference: Mapping[str, torch.Tensor], result: Mapping[str, torch.Tensor],
            limit: str) -> tuple[str, bool]:
    """How far ``result`` is from ``reference``, and whether that is within ``limit``."""
    if reference.keys() != result.keys():
        missing = sorted(set(reference) ^ set(result))[:3]
        return f"keys differ: {missing}", False
    worst_ulp, worst_relative, differing = 0, 0.0, 0
    for key, expected in reference.items():
        actual = result[key]
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return f"{key}: {actual.dtype} {list(actual.shape)} vs {expected.dtype} {list(expected.shape)}", False
        if same_bits(actual, expected):
            continue
        if not expected.is_floating_point():
            return f"{key}: integer values differ", False
        differing += 1
        worst_ulp = max(worst_ulp, int(ulp_distance(actual, expected).max()))
        scale = float(expected.float().abs().max()) or 1.0
        worst_relative = max(worst_relative, float((actual.float() - expected.float()).abs().max()) / scale)
    if differing == 0:
        return "bit-equal", True
    text = f"{differing} keys differ: max {worst_ulp} ulp, {worst_relative:.1e} of the key's range"
    allowed = {"exact": False, "ulp": worst_ulp <= 1, "reduction": worst_relative <= REDUCTION_RTOL or worst_ulp <= 1,
               "svd": worst_relative <= SVD_RTOL}[limit]
    return text, allowed


LIMIT_TEXT = {"exact": "bit-equal", "ulp": "≤ 1 ulp", "reduction": f"≤ {REDUCTION_RTOL:g} of range",
              "svd": f"≤ {SVD_RTOL:g} of range"}
INTEGER_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN payloads and -0 included), whatever the dtype."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    bits = INTEGER_OF_SIZE[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the tensors' float dtype lie between ``a`` and ``b``, elementwise."""
    width = a.element_size()

    def ordered(x: torch.Tensor) -> torch.Tensor:
        raw = x.contiguous().view(INTEGER_OF_SIZE[width]).to(torch.int64)
        magnitude = raw & ((1 << (8 * width - 1)) - 1)
        return torch.where(raw < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def run_check(check: Check, device: str) -> Result:
    started = time.perf_counter()
    try:
        reference = check.run("cpu")
        result = reference if device == "cpu" else check.run(device)
        difference, passed = compare(reference, result, check.limit)
    except Exception as error:  # a self-test reports every failure as a row, whatever raised it
        difference, passed = f"error: {type(error).__name__}: {str(error)[:160]}", False
    return Result(check.name, device, difference, LIMIT_TEXT[check.limit], passed, time.perf_counter() - started)


def device_dtypes(device: str, names: Iterable[str]) -> list[str]:
    """The model dtypes ``device`` can hold (fp8 only where a conversion works there)."""
    usable = []
    for name in names:
        try:
            torch.zeros(4, device=device).to(MODEL_DTYPES[name]).float()
            usable.append(name)
        except (RuntimeError, TypeError):
            pass
    return usable


def selftest(device: str, archs: Iterable[str], *, quick: bool,
             report: Callable[[Result], None] = lambda result: None) -> list[Result]:
    """Run every check for every architecture and model dtype on ``device``; the rows, in order."""
    results = []
    dtype_names = ("fp16",) if quick else device_dtypes(device, ("fp16", "bf16", "fp8"))
    with tempfile.TemporaryDirectory(prefix="supermerger-selftest-") as temp:
        folder = Path(temp)
        for arch in archs:
            for dtype_name in dtype_names:
                models = Models(folder, arch, MODEL_DTYPES[dtype_name])
                checks = merge_checks(models, quick=quick) + swap_checks(models)
                if dtype_name == dtype_names[0] and arch in ("sd1", "sdxl"):
                    checks += lora_checks(models, folder)
                for check in checks:
                    result = run_check(Check(f"{arch} {dtype_name}: {check.name}", check.run, check.limit), device)
                    results.append(result)
                    report(result)
    return results


def format_row(result: Result) -> str:
    verdict = "pass" if result.passed else "FAIL"
    return f"{verdict:4}  {result.check:58.58}  {result.device:6}  {result.difference:58.58}  {result.limit}"


def add_command(commands) -> None:
    cmd = commands.add_parser("selftest", help="run every merge path on a device and compare it with the CPU",
                              description=DESCRIPTION)
    add_arguments(cmd)
    cmd.set_defaults(run=run_selftest)


DESCRIPTION = ("Make small real-layout models in a temp folder, run every merge mode and calculation mode, block "
               "weights, elemental, the dice, the task-arithmetic methods, the LoRA tools and a swap + restore on "
               "DEVICE, and compare each result with the CPU's. Exits 1 on a failure.")


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--device", default="auto", help="cuda, cpu, mps or auto (default: cuda when present)")
    cmd.add_argument("--arch", nargs="+", choices=ARCHS, default=["sd1"], help="architectures (default sd1)")
    cmd.add_argument("--quick", action="store_true",
                     help="fp16 models and the main calculation modes only (what CI runs)")


def run_selftest(args: argparse.Namespace) -> int:
    ensure_utf8_console()
    device = str(resolve_device(args.device))
    if args.device not in ("auto", device) and not device.startswith(args.device):
        raise MergeError(f"device {args.device!r} is not available here; the self-test would only test the CPU")
    print(f"supermerger self-test on {device_label(device)}; torch {torch.__version__}")
    print(f"{'':4}  {'check':58}  {'device':6}  {'difference from the CPU':58}  limit")
    results = selftest(device, args.arch, quick=args.quick, report=lambda result: print(format_row(result),
                                                                                          flush=True))
    failed = [result for result in results if not result.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mergers.selftest``: the same command without the whole CLI's imports (Pillow, Gradio),
    for a machine that has only torch, safetensors, numpy and tqdm (a bare GPU box)."""
    parser = argparse.ArgumentParser(prog="python -m mergers.selftest", description=DESCRIPTION)
    add_arguments(parser)
    try:
        return run_selftest(parser.parse_args(argv))
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
