"""One rule for turning a device name into a torch device, shared by the CLI and the Dagster resource."""

from __future__ import annotations

import torch

from .errors import InfluenceInputError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InfluenceInputError(f"device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InfluenceInputError(f"device {name!r} asked for, but CUDA is not available")
    return device
