"""The weight Gram matrix: the only place Z0-Inf touches the model size D."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoints import Checkpoint, iter_weight_slices, open_checkpoints, select_parameters
from .devices import single_thread
from ..errors import InputError

# Columns widened to float64 at a time on the CPU: small enough that the shifted copy is still
# in cache when the product reads it (measured fastest on 2 cores; see benchmarks/estimators.py).
_COMPUTE_CHUNK = 1 << 12

WeightSource = torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike | Checkpoint]


def gram_matrix(
    weights: WeightSource,
    *,
    parameters: Sequence[str] | None = None,
    center: bool = True,
    max_elements: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """(T, T) float64 Gram matrix of T checkpoints' weight vectors.

    ``weights`` is a (T, D) tensor, a folder of safetensors checkpoints, or a list of their
    paths; files are streamed ``max_elements`` values per checkpoint at a time (default: 2^16 on
    a CPU, where small slices stay in cache, 2^22 on a GPU), in step order, and products are
    accumulated in float64. ``parameters`` are glob patterns selecting tensors
    by name (files only).

    With ``center`` (the default) every weight vector has the first checkpoint subtracted first:
    the estimators use only differences w_j - w_t, which a common shift leaves exactly unchanged,
    and it avoids the cancellation a raw W W^T suffers when weights are large and steps small.
    ``center=False`` gives the raw W W^T. On a GPU ``device`` the products run there; the result
    always comes back as a CPU tensor.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    max_elements = max_elements or (1 << 22 if on_gpu else 1 << 16)
    if isinstance(weights, torch.Tensor):
        if parameters:
            raise InputError("parameter patterns select tensors by name: pass checkpoint files, not a tensor")
        if weights.ndim != 2:
            raise InputError(f"weights: expected a (T, D) tensor, got shape {tuple(weights.shape)}")
        rows, total = weights.shape[0], -(-weights.shape[1] // max_elements)

        def blocks() -> Iterator[tuple[str, torch.Tensor]]:
            return (("weights", weights[:, s : s + max_elements]) for s in range(0, weights.shape[1], max_elements))

        def where(row: int) -> str:
            return f"weights row {row}"
    else:
        checkpoints = open_checkpoints(weights)
        names = select_parameters(checkpoints, parameters)
        rows, total = len(checkpoints), None

        def blocks() -> Iterator[tuple[str, torch.Tensor]]:
            return iter_weight_slices(checkpoints, names, max_elements, pin_memory=on_gpu)

        def where(row: int) -> str:
            return f"checkpoint {checkpoints[row].path}"

    gram = torch.zeros(rows, rows, dtype=torch.float64, device=device)
    chunk = max_elements if on_gpu else _COMPUTE_CHUNK
    work = torch.empty(rows, min(chunk, max_elements), dtype=torch.float64, device=device)
    # On a CPU the products are small ((T x 4096) slices): one compute thread, beside the reading thread.
    with contextlib.nullcontext() if on_gpu else single_thread():
        for _, block in tqdm(blocks(), desc="gram", unit="slice", total=total, disable=not progress):
            block = block.to(device, non_blocking=True)
            for start in range(0, block.shape[1], work.shape[1]):
                part = block[:, start : start + work.shape[1]]
                x = work[:, : part.shape[1]]
                if center:
                    torch.sub(part, part[:1].double(), out=x)  # one pass: widened to float64 and shifted, exactly
                else:
                    x.copy_(part)
                gram.addmm_(x, x.T)
            if on_gpu:  # the copy from the pinned read buffer must finish before that buffer is refilled
                torch.cuda.synchronize(device)
    if not torch.isfinite(gram).all():
        _raise_non_finite(blocks, where)
    return gram.cpu()


def _raise_non_finite(blocks: Callable[[], Iterator[tuple[str, torch.Tensor]]], where: Callable[[int], str]) -> None:
    """Slow path, only on error: find the first checkpoint and tensor holding NaN or inf."""
    for name, block in blocks():
        finite = torch.isfinite(block).all(dim=1)
        if not finite.all():
            row = int(torch.argmin(finite.to(torch.int8)))
            raise InputError(f"{where(row)}: tensor {name!r} holds NaN or inf values")
    raise InputError("weights: the Gram matrix overflowed (weights too large for float64 products)")
