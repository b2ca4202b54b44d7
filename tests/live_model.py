"""A loaded model for tests: a real ``torch.nn.Module`` with a checkpoint's key names.

``module_from_state_dict`` builds the module tree (A1111 builds an LDM model; we
only need the names, shapes and dtypes). ``FakeLive`` is the LiveModel protocol
(``mergers.host``) over such a module, loaded from a file as A1111 loads one,
and counts the host calls a swap makes. The A1111 stand-in (tests/a1111_stub)
imports this file by path, so it imports nothing from ``tests``.

Example:
    >>> live = FakeLive.load("a.safetensors", dtype=torch.float16, hijack=True)
    >>> Swapper(live).apply(merge_stream(recipe))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from mergers.checkpoint import open_checkpoint
from mergers.swap import live_tensors

WRAPPED = "wrapped"


def module_from_state_dict(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A nested module whose ``state_dict()`` keys are exactly ``state``'s, holding clones.

    Floating tensors become parameters, the others (position ids, counters) buffers.

    Example:
        >>> module = module_from_state_dict({"model.diffusion_model.out.2.weight": torch.ones(4, 10, 3, 3)})
        >>> list(module.state_dict())
        ['model.diffusion_model.out.2.weight']
    """
    root = torch.nn.Module()
    for key, tensor in state.items():
        *path, name = key.split(".")
        parent = _submodule(root, path)
        value = tensor.detach().clone()
        if value.is_floating_point():
            parent.register_parameter(name, torch.nn.Parameter(value))
        else:
            parent.register_buffer(name, value)
    return root


def _submodule(root: torch.nn.Module, path: list[str]) -> torch.nn.Module:
    module = root
    for name in path:
        if name not in module._modules:
            module.add_module(name, torch.nn.Module())
        module = module._modules[name]
    return module


def hijacked_name(key: str) -> str:
    """A checkpoint key → its name under A1111's SD1 hijack (text encoder and token embedding wrapped).

    Example:
        >>> hijacked_name("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        'cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight'
    """
    if not key.startswith("cond_stage_model."):
        return key
    key = key.replace("cond_stage_model.", f"cond_stage_model.{WRAPPED}.", 1)
    return key.replace(".token_embedding.", f".token_embedding.{WRAPPED}.")


def read_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, in file order."""
    with open_checkpoint(path) as ckpt:
        return {key: ckpt[key] for key in ckpt}


def load_state(path: str | Path, *, dtype: torch.dtype | None = None,
               keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """A file's tensors as A1111 loads them: read, then floating ones cast with ``.to(dtype)`` (``.half()``)."""
    state = {key: tensor for key, tensor in read_file(path).items() if keep(key)}
    if dtype is None:
        return state
    return {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}


class FakeLive:
    """The LiveModel protocol over a module built from a checkpoint file; counts the host calls.

    Example:
        >>> live = FakeLive.load("a.safetensors")
        >>> live.tensors()["model.diffusion_model.out.2.weight"].shape
    """

    def __init__(self, module: torch.nn.Module, source: Path | None, *,
                 on_before: Callable[[FakeLive], None] | None = None):
        self.module = module
        self.source = source
        self.before_calls = 0
        self.after_calls: list[bool] = []  # the ``merged`` flag of each after_change
        self.events: list[str] = []  # "before" / "after", in order
        self.on_before = on_before  # e.g. a simulated LoRA that takes its patch out of the weights

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = None, hijack: bool = False,
             keep: Callable[[str], bool] = lambda key: True, device: str = "cpu") -> FakeLive:
        """A model loaded from ``path``; ``hijack`` names its text encoder as A1111's hijack does."""
        state = load_state(path, dtype=dtype, keep=keep)
        if hijack:
            state = {hijacked_name(key): tensor for key, tensor in state.items()}
        return cls(module_from_state_dict(state).to(device), Path(path))

    def tensors(self) -> dict[str, torch.Tensor]:
        return live_tensors(self.module)

    def before_change(self) -> None:
        self.before_calls += 1
        self.events.append("before")
        if self.on_before is not None:
            self.on_before(self)

    def after_change(self, merged: bool) -> None:
        self.after_calls.append(merged)
        self.events.append("after")

    def snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copies of every live tensor by checkpoint key (tests compare against these)."""
        return {key: tensor.detach().to("cpu", copy=True) for key, tensor in self.tensors().items()}
