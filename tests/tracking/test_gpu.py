"""A team loop whose model and data live on a GPU: skipped where there is none (CPU machines, CI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from z0inf_pipeline.influence import read_loss_table
from z0inf_pipeline.tracking import ContractLogger, fetch_run
from z0inf_pipeline.training import ModelSpec, build_model, load_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_contract_logger_records_a_cuda_model(tracking_uri, tmp_path):
    data = load_dataset("digits")
    spec = ModelSpec("mlp", (64,), 10, (32,))
    torch.manual_seed(0)
    model = build_model(spec).cuda()
    x, y = data.train.features.cuda(), data.train.labels.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ContractLogger(model_spec=spec, train=(data.train.example_ids, x, y),
                        test=(data.test.example_ids, data.test.features.cuda(), data.test.labels.cuda())) as run:
        for step in range(0, 41):
            if step % 20 == 0:
                run.on_checkpoint(model, step, lr=0.1)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    fetched = fetch_run(run.run_id, cache_dir=tmp_path / "cache")
    table = read_loss_table(fetched.train_losses)
    cpu_model = fetched.load_model(40)  # rebuilt on the CPU from the safetensors checkpoint
    with torch.no_grad():
        expected = F.cross_entropy(cpu_model(data.train.features), data.train.labels, reduction="none")
    torch.testing.assert_close(table.values[-1], expected, rtol=1e-4, atol=1e-5)
