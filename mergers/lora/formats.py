"""Reading LoRA files: modules, their type and rank, and the weight change each one makes.

Types read (LyCORIS's and kohya's names; the formulas are A1111's ``extensions-builtin/Lora``):

| type | tensors per module | change ΔW (times the scale alpha / rank) |
|---|---|---|
| LoRA / LoCon | ``lora_down``, ``lora_up`` [, ``lora_mid``] | up @ down (mid: up∘mid∘down) |
| LoHa | ``hada_w1_a/b``, ``hada_w2_a/b`` [, ``hada_t1/t2``] | (w1a @ w1b) ⊙ (w2a @ w2b) |
| LoKr | ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` [, ``lokr_t2``] | w1 ⊗ w2 (Kronecker) |
| full | ``diff`` | diff (no scale) |

PEFT names up ``lora_B`` and down ``lora_A``. A missing or zero ``alpha`` means alpha = rank (scale 1), as
kohya and A1111 read it. The file is read lazily: a module's tensors are read when its change is computed.

Example:
    >>> with open_lora("style.safetensors") as lora:
    ...     lora.kind, lora.ranks, len(lora.modules)
    ('LoRA', (16,), 264)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergers.checkpoint import Checkpoint, open_checkpoint
from mergers.errors import CheckpointError
from mergers.lora.keys import canonical_module_name

# Tensor name endings → (part, module type). Longest first, so ".lora_down.weight" wins over ".weight".
PART_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_linear_layer.down.weight", "down", "lora"),
    (".lora_linear_layer.up.weight", "up", "lora"),
    (".lora_down.weight", "down", "lora"),
    (".lora_up.weight", "up", "lora"),
    (".lora_mid.weight", "mid", "lora"),
    (".lora_A.weight", "down", "lora"),
    (".lora_B.weight", "up", "lora"),
    ("_lora.down.weight", "down", "lora"),  # diffusers' attention processors: attn1.processor.to_q_lora
    ("_lora.up.weight", "up", "lora"),
    (".lora.down.weight", "down", "lora"),
    (".lora.up.weight", "up", "lora"),
    (".hada_w1_a", "w1a", "loha"),
    (".hada_w1_b", "w1b", "loha"),
    (".hada_w2_a", "w2a", "loha"),
    (".hada_w2_b", "w2b", "loha"),
    (".hada_t1", "t1", "loha"),
    (".hada_t2", "t2", "loha"),
    (".lokr_w1_a", "w1a", "lokr"),
    (".lokr_w1_b", "w1b", "lokr"),
    (".lokr_w2_a", "w2a", "lokr"),
    (".lokr_w2_b", "w2b", "lokr"),
    (".lokr_w1", "w1", "lokr"),
    (".lokr_w2", "w2", "lokr"),
    (".lokr_t2", "t2", "lokr"),
    (".diff", "diff", "full"),
    (".alpha", "alpha", ""),
)
# Parts of types we recognise but cannot apply yet: named in the error.
UNSUPPORTED_SUFFIXES = {".dora_scale": "DoRA", ".diff_b": "full (bias)", ".on_input": "IA3", ".oft_blocks": "OFT",
                        ".oft_diag": "OFT", ".a1.weight": "GLoRA", ".w_norm": "norm", ".b_norm": "norm"}
KIND_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full"}
REQUIRED_PARTS = {"lora": ({"down", "up"},), "loha": ({"w1a", "w1b", "w2a", "w2b"},),
                  "lokr": ({"w1", "w2"}, {"w1a", "w1b", "w2"}, {"w1", "w2a", "w2b"}, {"w1a", "w1b", "w2a", "w2b"}),
                  "full": ({"diff"},)}
EXAMPLES_IN_ERRORS = 3


@dataclass
class LoraModule:
    """One trained layer of a LoRA file: its kohya name, type and the file's tensor names by part."""

    name: str
    kind: str = ""
    parts: dict[str, str] = field(default_factory=dict)  # part -> tensor name in the file

    def rank(self, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        """The rank the scale divides by (None for full matrices: scale 1)."""
        if self.kind == "lora":
            return shapes[self.parts["down"]][0]
        for part in ("w1b", "w2b"):  # LoHa: w1b; LoKr: whichever factor is decomposed
            if part in self.parts:
                return shapes[self.parts[part]][0]
        return None

    def delta_shape(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The shape of ΔW as computed (before it is fitted to the target's shape), from the header alone."""
        return DELTA_SHAPES[self.kind]({part: tuple(shapes[name]) for part, name in self.parts.items()})

    def delta(self, reader, *, scale: float, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW · scale in ``dtype`` on ``device``; ``reader[name]`` gives the file's tensors."""
        tensors = {part: reader[name].to(device=device, dtype=dtype) for part, name in self.parts.items()
                   if part != "alpha"}
        return DELTAS[self.kind](tensors) * scale


def lora_delta(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """up @ down over the flattened kernel; with ``mid`` (LoCon Tucker): up ∘ mid ∘ down."""
    up, down = t["up"].flatten(1), t["down"]
    if "mid" in t:
        return torch.einsum("oi,ijkl,jc->ockl", up, t["mid"], down.flatten(1))
    return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def loha_delta(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Hadamard product of two low-rank products (LoHa); CP form with t1/t2 for convs."""
    first = _cp(t["t1"], t["w1a"], t["w1b"]) if "t1" in t else _product(t["w1a"], t["w1b"])
    second = _cp(t["t2"], t["w2a"], t["w2b"]) if "t2" in t else _product(t["w2a"], t["w2b"])
    return first * second


def lokr_delta(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Kronecker product of two factors, each full or low-rank (LoKr)."""
    w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2 = _cp(t["t2"], t["w2a"], t["w2b"])
    else:
        w2 = _product(t["w2a"], t["w2b"])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


def full_delta(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A stored difference, used as it is."""
    return t["diff"]


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])


def _cp(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild: ΔW[o, c, k, l] = Σ core[i, j, k, l] · wa[i, o] · wb[j, c] (LyCORIS make_weight_cp)."""
    return torch.einsum("ijkl,io,jc->ockl", core, wa, wb.flatten(1))


DELTAS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta, "full": full_delta}


# The same, on shapes: what each formula above returns, without reading a tensor.
def _lora_shape(s: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    if "mid" in s:
        return (s["up"][0], s["down"][1], *s["mid"][2:])
    return (s["up"][0], *s["down"][1:])


def _factor_shape(s: Mapping[str, tuple[int, ...]], a: str, b: str, core: str) -> tuple[int, ...]:
    if core in s:
        return (s[a][1], s[b][1], *s[core][2:])
    return (s[a][0], *s[b][1:])


def _lokr_shape(s: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    w1 = s["w1"] if "w1" in s else (s["w1a"][0], s["w1b"][1])
    w2 = s["w2"] if "w2" in s else _factor_shape(s, "w2a", "w2b", "t2")
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


DELTA_SHAPES = {"lora": _lora_shape, "loha": lambda s: _factor_shape(s, "w1a", "w1b", "t1"),
                "lokr": _lokr_shape, "full": lambda s: s["diff"]}


class LoraFile:
    """An open LoRA file: its modules by kohya name, with scales and lazy tensor reads."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.modules = group_modules(checkpoint.shapes, source=checkpoint.name)
        self.shapes = checkpoint.shapes

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def metadata(self) -> dict[str, str]:
        return self.checkpoint.metadata

    @property
    def kind(self) -> str:
        """"LoRA", "LoCon", "LoHa", "LoKr", "full", or several joined by "+"."""
        kinds = {self._kind_label(m) for m in self.modules.values()}
        if KIND_LABELS["locon"] in kinds:
            kinds.discard(KIND_LABELS["lora"])  # a LoCon file also has plain linear modules
        return "+".join(sorted(kinds))

    @property
    def ranks(self) -> tuple[int, ...]:
        """The distinct ranks of its modules, smallest first (empty for full-matrix files)."""
        return tuple(sorted({r for m in self.modules.values() if (r := m.rank(self.shapes)) is not None}))

    def alpha(self, module: LoraModule) -> float | None:
        """The module's stored alpha, or None (missing or zero: alpha = rank)."""
        name = module.parts.get("alpha")
        if name is None:
            return None
        value = float(self.checkpoint[name].float().reshape(-1)[0])
        return value if value and math.isfinite(value) else None

    def scale(self, module: LoraModule) -> float:
        """alpha / rank, or 1 when either is unknown (A1111's and kohya's rule)."""
        rank, alpha = module.rank(self.shapes), self.alpha(module)
        return alpha / rank if rank and alpha is not None else 1.0

    def delta(self, module: LoraModule, *, device="cpu", dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        """ΔW of ``module`` times its scale and ``scale``."""
        return module.delta(self.checkpoint, scale=self.scale(module) * scale, device=device, dtype=dtype)

    def _kind_label(self, module: LoraModule) -> str:
        if module.kind == "lora" and len(self.shapes[module.parts["down"]]) == 4 \
                and self.shapes[module.parts["down"]][2:] != (1, 1):
            return KIND_LABELS["locon"]  # kohya's LoRA trains 1x1 convs too; 3x3 kernels mean LoCon
        return KIND_LABELS[module.kind]

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> LoraFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_lora(path) -> LoraFile:
    """Open a LoRA file (.safetensors, or a .pt/.ckpt pickle read safely) and index its modules.

    Example:
        >>> open_lora("x.safetensors").modules["lora_te_text_model_encoder_layers_0_mlp_fc1"].kind
        'lora'
    """
    checkpoint = open_checkpoint(path)
    try:
        return LoraFile(checkpoint)
    except BaseException:
        checkpoint.close()
        raise


def group_modules(shapes: Mapping[str, tuple[int, ...]], *, source: str = "") -> dict[str, LoraModule]:
    """The file's tensors grouped into modules by kohya name; unknown or incomplete ones raise.

    Example:
        >>> list(group_modules({"lora_te_x.lora_down.weight": (4, 8), "lora_te_x.lora_up.weight": (8, 4)}))
        ['lora_te_x']
    """
    modules: dict[str, LoraModule] = {}
    unknown: list[str] = []
    for tensor_name in shapes:
        found = split_tensor_name(tensor_name)
        if found is None:
            unknown.append(tensor_name)
            continue
        module_name, part, kind = found
        module = modules.setdefault(canonical_module_name(module_name), LoraModule(canonical_module_name(module_name)))
        module.parts[part] = tensor_name
        module.kind = module.kind or kind
    if unknown:
        raise CheckpointError(_unknown_message(source, unknown))
    for module in modules.values():
        _check_complete(module, source)
    if not modules:
        raise CheckpointError(f"{source}: no LoRA modules in this file (is it a checkpoint, not a LoRA?)")
    return modules


def split_tensor_name(name: str) -> tuple[str, str, str] | None:
    """(module name, part, type) of one tensor name of a LoRA file, or None when not a LoRA part."""
    for suffix, part, kind in PART_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)], part, kind
    return None


def _check_complete(module: LoraModule, source: str) -> None:
    present = set(module.parts) - {"alpha"}
    if not module.kind:
        raise CheckpointError(f"{source}: module {module.name} has an alpha but no weights")
    if not any(required <= present for required in REQUIRED_PARTS[module.kind]):
        raise CheckpointError(f"{source}: module {module.name} ({KIND_LABELS[module.kind]}) lacks tensors; "
                              f"it has {', '.join(sorted(present))}")


def _unknown_message(source: str, names: Iterable[str]) -> str:
    names = list(names)
    kinds = sorted({label for name in names for suffix, label in UNSUPPORTED_SUFFIXES.items() if name.endswith(suffix)})
    what = f"{', '.join(kinds)} modules are not supported yet" if kinds else "these tensors are no LoRA part we know"
    examples = ", ".join(names[:EXAMPLES_IN_ERRORS])
    more = f" and {len(names) - EXAMPLES_IN_ERRORS} more" if len(names) > EXAMPLES_IN_ERRORS else ""
    return f"{source}: {what} ({examples}{more}); readable types: LoRA, LoCon, LoHa, LoKr, full"
