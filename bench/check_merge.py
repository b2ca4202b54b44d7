"""Check a weight-sum output against its inputs on a few keys (first, middle, last).

Run as its own process so the benchmark's parent never loads torch: a child's
peak RSS (from wait4) starts from the parent's size at fork.

Example:
    python bench/check_merge.py out.safetensors a.safetensors b.safetensors --alpha 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors import safe_open


def weight_sum_error(out: Path, a_path: Path, b_path: Path, alpha: float) -> float:
    """Largest |out - ((1-α)A + αB)| over the first, middle and last key of ``out``; 0 when right."""
    with safe_open(a_path, "pt") as a, safe_open(b_path, "pt") as b, safe_open(out, "pt") as merged:
        keys = list(merged.keys())
        worst = 0.0
        for key in (keys[0], keys[len(keys) // 2], keys[-1]):
            got = merged.get_tensor(key)
            want = (a.get_tensor(key).float() * (1 - alpha) + b.get_tensor(key).float() * alpha).to(got.dtype)
            worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("model_a", type=Path)
    parser.add_argument("model_b", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)
    error = weight_sum_error(args.output, args.model_a, args.model_b, args.alpha)
    print(f"{args.output}: max error {error} on 3 keys")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
