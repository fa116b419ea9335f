"""Small checkpoint folders written with the real safetensors writer."""

from __future__ import annotations

import pytest
import torch

from z0inf_pipeline.influence import save_checkpoint

SHAPES = {"encoder.weight": (5, 4), "encoder.bias": (5,), "head.weight": (3, 5), "head.bias": (3,)}


def random_states(T: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()} for _ in range(T)]


def flatten(state: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1).double() for n in names])


@pytest.fixture
def checkpoint_dir(tmp_path):
    """Six checkpoints written out of order; steps 0, 10, ..., 50 with a decaying learning rate."""

    def make(T: int = 6, seed: int = 0):
        states = random_states(T, seed)
        folder = tmp_path / "ckpts"
        for t in reversed(range(T)):
            save_checkpoint(folder / f"ckpt-{t:03d}.safetensors", states[t], step=10 * t, epoch=t, learning_rate=0.1 / (t + 1))
        return folder, states

    return make
