"""The weight Gram matrix: the only place Z0-Inf touches the model size D."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .checkpoints import Checkpoint, iter_weight_slices, open_checkpoints, select_parameters
from .errors import InfluenceInputError

WeightSource = torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike | Checkpoint]


def gram_matrix(
    weights: WeightSource,
    *,
    parameters: Sequence[str] | None = None,
    center: bool = True,
    max_elements: int = 1 << 22,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """(T, T) float64 Gram matrix of T checkpoints' weight vectors.

    ``weights`` is a (T, D) tensor, a folder of safetensors checkpoints, or a list of their
    paths; files are streamed a slice of about ``max_elements`` values per checkpoint at a time
    and read in step order. ``parameters`` are glob patterns selecting tensors by name (files only).

    With ``center`` (the default) the weights are centred on their mean over checkpoints first:
    the estimators use only differences w_j - w_t, which centring leaves unchanged, and it avoids
    the cancellation that a raw W W^T suffers when the weights are large and the steps are small.
    ``center=False`` gives the raw W W^T. On a GPU ``device`` the products run there; the
    result always comes back as a CPU tensor.
    """
    if isinstance(weights, torch.Tensor):
        if parameters:
            raise InfluenceInputError("parameter patterns select tensors by name: pass checkpoint files, not a tensor")
        if weights.ndim != 2:
            raise InfluenceInputError(f"weights: expected a (T, D) tensor, got shape {tuple(weights.shape)}")
        slices = (("weights", weights[:, s : s + max_elements]) for s in range(0, weights.shape[1], max_elements))
        sources = None
        total = -(-weights.shape[1] // max_elements)
        rows = weights.shape[0]
    else:
        sources = open_checkpoints(weights)
        names = select_parameters(sources, parameters)
        slices = iter_weight_slices(sources, names, max_elements)
        total = None
        rows = len(sources)
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=device)
    for name, block in tqdm(slices, desc="gram", unit="slice", total=total, disable=not progress):
        block = block.to(device=device, dtype=torch.float64)
        finite = torch.isfinite(block).all(dim=1)
        if not finite.all():
            bad = int(torch.argmin(finite.to(torch.int8)))
            where = f"checkpoint {sources[bad].path}" if sources else f"weights row {bad}"
            raise InfluenceInputError(f"{where}: tensor {name!r} holds NaN or inf values")
        if center:
            block = block - block.mean(dim=0, keepdim=True)
        gram.addmm_(block, block.T)
    return gram.cpu()
