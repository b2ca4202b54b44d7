"""What is swapped into the loaded model, as a stack: the merge (or the checkpoint), then layers on top.

A layer is a change to some keys made by another feature, e.g. the LoRA tab's "Apply to loaded model".
It goes on top of what is in the model, never silently in place of it: each key it changes is computed
again from the bottom (the merge's recipe, else the checkpoint file) up through every layer, so the model
holds exactly what saving the merge and baking the layers into that file would give. A layer of a kind
replaces the one of that kind already there (applying the tab's LoRAs again replaces its last ones).

Example:
    >>> layer = Layer("lora", "style:0.8", frozenset(keys), opener)
    >>> session.apply_layer(layer).stack
    'a x 0.7 + b x 0.3, then LoRA style:0.8'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# key, the value below this layer → the value with it
Change = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """One change on top of the merge: the keys it changes and how (``open()`` yields the change)."""

    kind: str  # "lora": a new layer of a kind replaces the old one of that kind
    label: str  # what it is, as the user wrote it ("style:0.8, other:0.5")
    keys: frozenset[str]  # the checkpoint keys it changes
    open: Callable[[], contextlib.AbstractContextManager[Change]] = field(compare=False)
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)  # infotext fields

    @property
    def title(self) -> str:
        return f"{'LoRA' if self.kind == 'lora' else self.kind} {self.label}"


@dataclass(frozen=True)
class LayerOutcome:
    """What ``MergeSession.apply_layer`` did, for the message."""

    layer: Layer
    changed: int  # live tensors written (the layer's keys, and those of a layer it replaced)
    seconds: float
    stack: str  # what the model holds now, bottom first
    replaced: tuple[Layer, ...] = ()  # layers of the same kind it took out


def stack_name(base: str, layers: Sequence[Layer]) -> str:
    """The stack in words, bottom first.

    Example:
        >>> stack_name("a x 0.7 + b x 0.3", [Layer("lora", "style:0.8", frozenset(), None)])
        'a x 0.7 + b x 0.3, then LoRA style:0.8'
    """
    return ", then ".join([base, *(layer.title for layer in layers)])


def replace_layer(layers: Sequence[Layer], new: Layer) -> tuple[tuple[Layer, ...], tuple[Layer, ...]]:
    """The stack with ``new`` on top and the layers of its kind taken out; and those taken out."""
    kept = tuple(layer for layer in layers if layer.kind != new.kind)
    return (*kept, new), tuple(layer for layer in layers if layer.kind == new.kind)


def layer_infotext(layers: Iterable[Layer]) -> dict[str, Any]:
    """The layers' infotext fields; a field two layers share lists both, bottom first ("; ")."""
    fields: dict[str, list[str]] = {}
    for layer in layers:
        for name, value in layer.info.items():
            fields.setdefault(name, []).append(str(value))
    return {name: "; ".join(values) for name, values in fields.items()}


@contextlib.contextmanager
def stacked(base: Iterable[tuple[str, torch.Tensor]], layers: Sequence[Layer]) -> Iterator[
        Iterator[tuple[str, torch.Tensor]]]:
    """``base``'s ``(key, value)`` pairs with every layer that changes a key applied to it, bottom first."""
    with contextlib.ExitStack() as opened:
        changes = [(layer.keys, opened.enter_context(layer.open())) for layer in layers]

        def pairs() -> Iterator[tuple[str, torch.Tensor]]:
            for key, value in base:
                for keys, change in changes:
                    if key in keys:
                        value = change(key, value)
                yield key, value

        yield pairs()
