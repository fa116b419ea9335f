"""The same numbers on a GPU as on the CPU. CI has no GPU: these run only where CUDA is present
(they ran on the lent H100/H200 machine; see the README's Performance section)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from z0inf_pipeline.influence import compute_loss_table, gram_matrix, self_influence, train_test_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")


def test_estimators_on_gpu_match_cpu(checkpoint_dir):
    folder, _ = checkpoint_dir(T=6)
    G_cpu, G_gpu = gram_matrix(folder), gram_matrix(folder, device="cuda")
    torch.testing.assert_close(G_gpu, G_cpu, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    L, Lz = torch.rand(6, 300, generator=gen, dtype=torch.float64), torch.rand(6, 40, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(self_influence(G_cpu, L.cuda()).cpu(), self_influence(G_cpu, L))
    top_gpu, top_cpu = train_test_topk(G_cpu, L.cuda(), Lz.cuda(), k=5), train_test_topk(G_cpu, L, Lz, k=5)
    assert torch.equal(top_gpu.proponents.cpu(), top_cpu.proponents)
    torch.testing.assert_close(top_gpu.opponent_scores.cpu(), top_cpu.opponent_scores)


def test_loss_table_on_gpu_matches_cpu(tmp_path):
    from z0inf_pipeline.influence import save_checkpoint

    factory = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    for t in range(3):
        save_checkpoint(tmp_path / f"c{t}.safetensors", factory().state_dict(), step=t)
    X, y = torch.randn(500, 8), torch.randint(0, 4, (500,))
    loss = nn.CrossEntropyLoss(reduction="none")
    cpu = compute_loss_table(factory, tmp_path, (X, y), loss, progress=False)
    gpu = compute_loss_table(factory, tmp_path, (X, y), loss, device="cuda", progress=False)
    torch.testing.assert_close(gpu.values, cpu.values, rtol=1e-4, atol=1e-5)
