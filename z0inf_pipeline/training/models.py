"""The models a run can train, described by a small JSON-able spec so any checkpoint can be rebuilt."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from ..errors import InputError

MODEL_KINDS = ("logreg", "mlp", "cnn")
_CNN_CHANNELS = (16, 32)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network a checkpoint belongs to (its weights come from the checkpoint)."""

    kind: Literal["logreg", "mlp", "cnn"]
    input_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...] = (64,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.kind not in MODEL_KINDS:
            raise InputError(f"model kind {self.kind!r}: must be one of {list(MODEL_KINDS)}")
        if self.num_classes < 2:
            raise InputError(f"model spec: num_classes {self.num_classes} must be at least 2")
        if any(h < 1 for h in self.hidden):
            raise InputError(f"model spec: hidden widths {list(self.hidden)} must be positive")
        if self.kind == "cnn" and len(self.input_shape) != 3:
            raise InputError(
                f"model spec: a cnn needs (channels, height, width) inputs, not {list(self.input_shape)} "
                "(load digits with image=True)"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "input_shape": list(self.input_shape), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        try:
            return cls(kind=d["kind"], input_shape=tuple(d["input_shape"]), num_classes=int(d["num_classes"]),
                       hidden=tuple(d.get("hidden", (64,))))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"model spec {d!r}: malformed ({exc!r})") from None


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised network for ``spec`` (seed torch beforehand for reproducible weights)."""
    if spec.kind == "cnn":
        channels, height, width = spec.input_shape
        first, second = _CNN_CHANNELS
        return nn.Sequential(
            nn.Conv2d(channels, first, 3, padding=1), nn.ReLU(),
            nn.Conv2d(first, second, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            *_dense(second * (height // 2) * (width // 2), spec.hidden, spec.num_classes),
        )
    widths = () if spec.kind == "logreg" else spec.hidden
    return nn.Sequential(nn.Flatten(), *_dense(math.prod(spec.input_shape), widths, spec.num_classes))


def _dense(inputs: int, hidden: tuple[int, ...], outputs: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    return layers + [nn.Linear(inputs, outputs)]
