"""Peak memory of a full-size merge of an architecture the original never knew (issue #17).

Writes two full-size synthetic diffusion models one tensor at a time (real widths and block counts from
``tests/arch_keys``), then merges them to file in a child process (``python -m mergers merge``, Weight sum
with block weights from the model's layout file) and reports the child's wall time and peak RSS
(``os.wait4``) beside the largest tensor. Models: ``lumina2`` (Lumina-Image 2.0, bf16, 2.6B parameters,
5.1 GB a file) and ``wan`` (Wan 2.1/2.2 T2V 14B, fp8 e4m3fn, 14.3 GB a file). Both were chosen because two
inputs and the output fit this machine's free disk; Qwen-Image (41 GB per bf16 file) does not. The files
are deleted afterwards unless ``--keep``.

Example:
    python bench/new_arch.py --model lumina2 --dir /tmp/bench-new-arch
    python bench/new_arch.py --model wan --dir /tmp/bench-new-arch     # 3 × 14.3 GB on disk
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from arch_keys import lumina2_full, wan_full
from make_models import write_model

from mergers.writer import TensorSpec

# model -> (its keys, stored dtype, block weights in its layout)
MODELS = {
    "lumina2": (lumina2_full, torch.bfloat16, "ALL:0.5, NR00-CR01:0.2, L00-L12:0.3, L13-L25:0.8, OUT:1"),
    "wan": (wan_full, torch.float8_e4m3fn, "ALL:0.5, B00-B19:0.3, B20-B39:0.8, OUT:1"),
}


def specs(model: str) -> list[TensorSpec]:
    """Every tensor of ``model`` in its stored dtype, sorted by name as safetensors files list them."""
    keys, dtype, _ = MODELS[model]
    return [TensorSpec(key, dtype, shape) for key, shape in sorted(keys().items())]


def merge_child(a: Path, b: Path, out: Path, weights: str) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, exit status) of one merge run as a child process."""
    return run_child([sys.executable, "-m", "mergers", "merge", str(a), str(b), "-o", str(out), "--overwrite",
                      "--weights-alpha", weights])


# The child is started through this small launcher: Linux carries a parent's peak RSS into a forked (or
# vforked) child's ru_maxrss, so a child forked by this script (which held whole tensors while writing the
# models) would report our peak, not its own. The launcher holds a few MB when it forks the measured process.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}", file=sys.stderr)
"""


def run_child(argv: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, exit status) of ``argv`` run as a grandchild through :data:`LAUNCHER`."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                          encoding="utf-8", check=False)
    lines = done.stderr.strip().splitlines()
    sys.stderr.write("\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else ""))
    seconds, peak_kib, status = lines[-1].split()
    return float(seconds), int(peak_kib) / 1024, int(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lumina2")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "models")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    tensors = specs(args.model)
    paths = [args.dir / f"{args.model}_{name}.safetensors" for name in ("a", "b")]
    out = args.dir / f"{args.model}_merged.safetensors"
    try:
        for seed, path in enumerate(paths, 1):
            started = time.perf_counter()
            write_model(path, tensors, seed)
            print(f"wrote {path.name}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s")
        _, baseline, _ = run_child([sys.executable, "-c", "import torch, mergers.cli"])
        seconds, peak, status = merge_child(*paths, out, MODELS[args.model][2])
        largest = max(tensors, key=lambda s: math.prod(s.shape))
        largest_mib = largest.nbytes / 2**20
        print(f"merge exit {status}: {seconds:.1f} s, peak RSS {peak:.0f} MiB (importing torch and mergers alone: "
              f"{baseline:.0f} MiB); output {out.stat().st_size / 1e9:.2f} GB; largest tensor {largest.key} "
              f"{list(largest.shape)} = {largest_mib:.1f} MiB; peak above the imports = "
              f"{(peak - baseline) / largest_mib:.1f} largest tensors")
        return status
    finally:
        if not args.keep:
            for path in (*paths, out):
                path.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
