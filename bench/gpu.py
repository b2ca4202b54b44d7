"""The GPU check in one script: the self-test on the device, then merge timings on it and on its CPU cores.

Made for a lent GPU machine that has torch, safetensors, numpy and tqdm and nothing else (no psutil, no
Pillow, no network): full-size synthetic SD1.5 and SDXL models (bench/make_models.py) go into a temp
folder, and each case runs in a child process so its peak RSS (``ru_maxrss``) is its own. Every case is
timed ``--repeats`` times after a warm-up on the GPU, ``--cpu-repeats`` times on the CPU (best reported); a
case over ``--case-timeout`` is left out and said so. Writes ``bench/results-gpu.md``
with the device's name, and prints the same table.

Cases: merge to file (weight sum); merge + in-place swap into a model held on the device in fp16; restore;
cosineA and TIES to file (SD1.5). Peak extra VRAM is ``torch.cuda.max_memory_allocated`` minus what the
held model takes, set against the largest key (the target: at most 2 of those).

Example (sized to stay well under 10 minutes on one GPU with 16 cores; not yet run on a GPU):
    python bench/gpu.py                       # cuda, then the CPU for the ratio
    python bench/gpu.py --devices cpu --archs sd1 --repeats 1     # a dry run without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.make_models import ensure_model  # noqa: E402
from mergers.checkpoint import open_checkpoint  # noqa: E402
from mergers.merge import merge_stream, merge_to_file  # noqa: E402
from mergers.recipe import Recipe  # noqa: E402
from mergers.selftest import DeviceModel, format_row, selftest  # noqa: E402
from mergers.swap import Swapper  # noqa: E402

CASES = {  # name → (recipe changes, what is timed)
    "merge to file": ({}, "file"),
    "merge + swap": ({}, "swap"),
    "restore": ({}, "restore"),
    "cosineA to file": ({"calcmode": "cosineA"}, "file"),
    "TIES to file": ({"mode": "ties"}, "file"),
}
SD1_ONLY = {"cosineA to file", "TIES to file"}


def run_case(case: str, arch: str, device: str, folder: Path, repeats: int) -> dict:
    """One case in this (child) process: warm-up, then ``repeats`` timed runs."""
    changes, kind = CASES[case]
    names = ("a", "b", "c") if changes.get("mode") == "ties" else ("a", "b")
    paths = {name: str(ensure_model(folder, arch, name)) for name in names}
    recipe = Recipe(model_a=paths["a"], model_b=paths["b"], model_c=paths.get("c"), alpha=0.5, **changes)
    live = DeviceModel(paths["a"], device) if kind in ("swap", "restore") else None
    if live is not None and device != "cpu":
        live._tensors = {k: v.half() if v.is_floating_point() else v for k, v in live.tensors().items()}
    held = sum(t.nbytes for t in live.tensors().values()) if live is not None else 0
    swapper = Swapper(live) if live is not None else None
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_up = 1 if device.startswith("cuda") else 0  # CUDA's context and kernels; the CPU needs none
    for run in range(repeats + warm_up):
        started = time.perf_counter()
        if kind == "file":
            merge_to_file(recipe, folder / f"out_{arch}_{device.replace(':', '')}.safetensors", device=device,
                          overwrite=True)
        elif kind == "swap":
            swapper.apply(merge_stream(recipe, device=device, output_device=device))
        else:
            swapper.apply(merge_stream(recipe, device=device, output_device=device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            swapper.restore()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if run >= warm_up:
            times.append(time.perf_counter() - started)
    with open_checkpoint(paths["a"]) as ckpt:
        largest = max(_nbytes(ckpt, key) for key in ckpt)
    peak_vram = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return {"case": case, "arch": arch, "device": device, "best_s": min(times), "median_s": sorted(times)[len(times) // 2],
            "runs": len(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "extra_vram_mb": (peak_vram - held) / 2**20 if peak_vram else None, "largest_key_mb": largest / 2**20}


def _nbytes(ckpt, key: str) -> int:
    count = 1
    for n in ckpt.shape(key):
        count *= n
    return count * torch.empty((), dtype=ckpt.dtype(key)).element_size()


def child(args: argparse.Namespace) -> int:
    print(json.dumps(run_case(args.case, args.arch, args.device, Path(args.folder), args.repeats)))
    return 0


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def table(rows: list[dict]) -> list[str]:
    lines = ["| arch | case | device | best s | median s | runs | peak RSS MB | extra VRAM MB | largest key MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        vram = "" if row.get("extra_vram_mb") is None else f"{row['extra_vram_mb']:.0f}"
        lines.append(f"| {row['arch']} | {row['case']} | {row['device']} | {row['best_s']:.2f} | {row['median_s']:.2f} | "
                     f"{row['runs']} | {row['peak_rss_mb']:.0f} | {vram} | {row['largest_key_mb']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--archs", nargs="+", default=["sd1", "sdxl"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case on the GPU, after a warm-up")
    parser.add_argument("--cpu-repeats", type=int, default=1, help="timed runs per case on the CPU")
    parser.add_argument("--case-timeout", type=int, default=150, help="seconds a case may take before it is left out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-gpu.md")
    parser.add_argument("--skip-selftest", action="store_true")
    parser.add_argument("--models", type=Path, help="keep the synthetic models here (default: a temp folder)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return child(args)
    devices = [d for d in args.devices if not d.startswith("cuda") or torch.cuda.is_available()]
    lines = [f"# GPU results ({time.strftime('%Y-%m-%d')})", "",
             f"torch {torch.__version__}; devices: " + "; ".join(f"{d}: {device_name(d)}" for d in devices), "",
             "Command: `python bench/gpu.py` (bench/gpu.py says what each case times).", ""]
    failures = 0
    for device in devices:
        if device == "cpu" or args.skip_selftest:
            continue
        rows = selftest(device, ["sd1", "sdxl"], quick=False, report=lambda r: print(format_row(r), flush=True))
        failures += sum(not r.passed for r in rows)
        lines += [f"## Self-test on {device}: {len(rows) - failures} passed, {failures} failed", "", "```",
                  *(format_row(r) for r in rows), "```", ""]
    rows, left_out = [], []
    with tempfile.TemporaryDirectory(prefix="supermerger-gpu-bench-") as scratch:
        temp = str(args.models or scratch)
        for arch in args.archs:
            for device in devices:
                for case in CASES:
                    if case in SD1_ONLY and arch != "sd1":
                        continue
                    repeats = args.repeats if device != "cpu" else args.cpu_repeats
                    command = [sys.executable, __file__, "--case", case, "--arch", arch, "--device", device,
                               "--folder", temp, "--repeats", str(repeats)]
                    try:
                        done = subprocess.run(command, capture_output=True, text=True, check=False,
                                              timeout=args.case_timeout)
                    except subprocess.TimeoutExpired:
                        print(f"{arch} {case} on {device}: over {args.case_timeout} s, left out", flush=True)
                        left_out.append(f"- {arch} {case} on {device}: over {args.case_timeout} s, left out")
                        continue
                    if done.returncode:
                        print(f"{arch} {case} on {device} failed:\n{done.stderr[-2000:]}", flush=True)
                        failures += 1
                        continue
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(table(rows)[-1], flush=True)
    lines += ["## Timings", "", *table(rows), "", *left_out, ""]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
