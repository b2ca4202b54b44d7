"""``python -m mergers lora to-checkpoint|merge|extract|info``: the LoRA tools on the command line.

Example:
    python -m mergers lora to-checkpoint sd15.safetensors style.safetensors:0.8:OUTALL -o sd15_style.safetensors
    python -m mergers lora merge a.safetensors:0.7 b.safetensors:0.5 -o ab.safetensors --rank auto
    python -m mergers lora extract tuned.safetensors base.safetensors -o diff.safetensors --rank 64 --conv-rank 32
"""

from __future__ import annotations

from tqdm import tqdm

from mergers.cli import print_facts
from mergers.lora.apply import loras_to_checkpoint
from mergers.lora.blocks import parse_entry
from mergers.lora.extract import DEFAULT_RANK, extract_lora
from mergers.lora.formats import open_lora
from mergers.lora.match import family_label, lora_family
from mergers.lora.merge import merge_loras

ENTRY_HELP = ("a LoRA as FILE[:RATIO[:BLOCKS]]; BLOCKS is a preset (ALL, INS, OUTALL, … or a Merge preset such "
              "as GRAD_V) or 12/17/20/26 comma-separated values")


def add_command(commands) -> None:
    """Add ``lora`` and its sub-commands to the CLI's sub-parsers."""
    lora = commands.add_parser("lora", help="merge LoRAs into a checkpoint or together, extract a LoRA",
                               description="LoRA tools: to-checkpoint, merge, extract, info.")
    sub = lora.add_subparsers(dest="lora_command", required=True, metavar="LORA_COMMAND")
    _add_to_checkpoint(sub)
    _add_merge(sub)
    _add_extract(sub)
    _add_info(sub)


def _add_to_checkpoint(sub) -> None:
    cmd = sub.add_parser("to-checkpoint", help="add LoRAs into a checkpoint: W + Σ ratio·scale·ΔW")
    cmd.add_argument("checkpoint", metavar="CHECKPOINT")
    cmd.add_argument("loras", metavar="LORA", nargs="+", help=ENTRY_HELP)
    _add_output(cmd, dtype_help="output precision (default: as the checkpoint)")
    cmd.set_defaults(run=run_to_checkpoint)


def _add_merge(sub) -> None:
    cmd = sub.add_parser("merge", help="merge LoRAs into one LoRA (exact concatenation, or SVD to a rank)")
    cmd.add_argument("loras", metavar="LORA", nargs="+", help=ENTRY_HELP)
    cmd.add_argument("--rank", help="SVD to this rank, or 'auto' (the largest input rank); "
                                    "default: concatenate (exact, ranks add up)")
    _add_output(cmd, dtype_help="output precision (default: as the first LoRA)")
    cmd.set_defaults(run=run_merge)


def _add_extract(sub) -> None:
    cmd = sub.add_parser("extract", help="extract a LoRA from alpha·TUNED − beta·BASE by SVD")
    cmd.add_argument("tuned", metavar="TUNED")
    cmd.add_argument("base", metavar="BASE")
    cmd.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"rank of each layer (default {DEFAULT_RANK})")
    cmd.add_argument("--conv-rank", type=int, help="also extract resnet convs (3x3 at this rank), as LoCon")
    cmd.add_argument("--alpha", type=float, default=1.0, help="factor of TUNED (default 1)")
    cmd.add_argument("--beta", type=float, default=1.0, help="factor of BASE (default 1)")
    cmd.add_argument("--min-diff", type=float, default=0.0,
                     help="leave out layers whose difference is at most this everywhere (default 0)")
    _add_output(cmd, dtype_help="output precision (default fp16)", default_dtype="fp16")
    cmd.set_defaults(run=run_extract)


def _add_info(sub) -> None:
    cmd = sub.add_parser("info", help="type, rank, architecture and modules of a LoRA file")
    cmd.add_argument("file", metavar="LORA")
    cmd.add_argument("--json", action="store_true", help="print JSON")
    cmd.set_defaults(run=run_info)


def _add_output(cmd, *, dtype_help: str, default_dtype: str | None = None) -> None:
    cmd.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="the file to write")
    cmd.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=default_dtype, help=dtype_help)
    cmd.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    cmd.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")


def run_to_checkpoint(args) -> int:
    entries = [parse_entry(text) for text in args.loras]
    with _progress("adding LoRAs") as progress:
        result = loras_to_checkpoint(args.checkpoint, entries, args.output, device=args.device, dtype=args.dtype,
                                     overwrite=args.overwrite, on_progress=progress)
    print(f"{result.architecture}: {result.changed} keys changed by {len(entries)} LoRA(s); "
          f"wrote {result.path} in {result.seconds:.1f} s")
    return 0


def run_merge(args) -> int:
    entries = [parse_entry(text) for text in args.loras]
    with _progress("merging LoRAs") as progress:
        result = merge_loras(entries, args.output, rank=args.rank, device=args.device, dtype=args.dtype,
                             overwrite=args.overwrite, on_progress=progress)
    print(f"wrote {result.summary}")
    return 0


def run_extract(args) -> int:
    with _progress("extracting") as progress:
        result = extract_lora(args.tuned, args.base, args.output, rank=args.rank, conv_rank=args.conv_rank,
                              alpha=args.alpha, beta=args.beta, min_diff=args.min_diff, device=args.device,
                              dtype=args.dtype, overwrite=args.overwrite, on_progress=progress)
    print(f"wrote {result.summary}")
    return 0


def run_info(args) -> int:
    with open_lora(args.file) as lora:
        print_facts(lora_info(lora), as_json=args.json)
    return 0


def lora_info(lora) -> dict:
    """What ``lora info`` shows about an open LoRA file."""
    family = lora_family(lora)
    return {"file": str(lora.path), "type": lora.kind, "ranks": list(lora.ranks), "architecture": family_label(family),
            "modules": len(lora.modules), "text encoder": any("_te" in name[:9] for name in lora.modules)}


class _progress:
    """A tqdm bar driven by an ``on_progress(done, total, key)`` callback."""

    def __init__(self, label: str):
        self.bar = tqdm(total=0, unit="key", desc=label, disable=None)

    def __enter__(self):
        def progress(done: int, total: int, key: str) -> None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        return progress

    def __exit__(self, *exc) -> None:
        self.bar.close()
