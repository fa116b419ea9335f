"""Example ids are any 64-bit integers, negative ones included: a team's ContractLogger run whose examples
have negative ids goes through the real influence_job, and every test-example link the real
`z0inf review serve` puts on its pages opens (no 404 for ``/runs/RUN/tests/-123``)."""

from __future__ import annotations

import re
from dataclasses import replace

import requests
import torch
import torch.nn.functional as F

from z0inf_pipeline.tracking import ContractLogger
from z0inf_pipeline.training import ModelSpec, build_model, checkpoint_steps, load_dataset

from ...conftest import _stop
from .conftest import _analysed, start_server

ID_SHIFT = 1_000_000  # every id below zero


def _negative_id_run(uri: str) -> str:
    data = load_dataset("breast_cancer", seed=1)
    train = replace(data.train, example_ids=data.train.example_ids - ID_SHIFT)
    test = replace(data.test, example_ids=data.test.example_ids - ID_SHIFT)
    spec = ModelSpec("logreg", (30,), 2)
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    total, per_epoch = 40, 4
    wanted = set(checkpoint_steps(total, count=5))
    with ContractLogger(model_spec=spec, train=train, test=test, tracking_uri=uri, experiment="negative-ids") as run:
        run.on_checkpoint(model, 0, epoch=0, lr=0.05)
        batches = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).chunk(per_epoch)
        for step in range(1, total + 1):
            optimizer.zero_grad()
            batch = batches[(step - 1) % per_epoch]
            F.cross_entropy(model(train.features[batch]), train.labels[batch]).backward()
            optimizer.step()
            if step in wanted:
                run.on_checkpoint(model, step, epoch=step / per_epoch, lr=0.05)
    return run.run_id


def test_links_to_test_examples_with_negative_ids_open(tmp_path):
    run = _analysed(tmp_path, _negative_id_run)
    server = start_server(run, run.data_dir)
    try:
        run_page = requests.get(f"{server.url}/runs/{run.run_id}", timeout=60)
        assert run_page.status_code == 200
        links = set(re.findall(rf'href="(/runs/{run.run_id}/tests/-?\d+)"', run_page.text))
        tests_page = requests.get(f"{server.url}/runs/{run.run_id}/tests", timeout=60)
        assert tests_page.status_code == 200
        links |= set(re.findall(rf'href="(/runs/{run.run_id}/tests/-?\d+)"', tests_page.text))
        assert links and all(int(link.rsplit("/", 1)[1]) < 0 for link in links)
        for link in sorted(links)[:10]:
            answer = requests.get(server.url + link, timeout=60)
            assert answer.status_code == 200, (link, answer.text[:500])
    finally:
        _stop(server.process)
