"""Loss tables: equal to a direct per-example computation, any loss, validated on read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import (
    LossTable,
    compute_loss_table,
    read_loss_table,
    save_checkpoint,
)
from z0inf_pipeline.influence.loss_tables import check_loss_table


def _factory():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.fixture
def setup(tmp_path):
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(37, 4, generator=gen), torch.randint(0, 3, (37,), generator=gen)
    models = []
    for t in range(4):
        model = _factory()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * t)
        save_checkpoint(tmp_path / f"c{t}.safetensors", model.state_dict(), step=t * 7)
        models.append(model)
    return tmp_path, models, X, y


def test_loss_table_equals_direct_per_example_losses(setup):
    folder, models, X, y = setup
    table = compute_loss_table(_factory, folder, (X, y), nn.CrossEntropyLoss(reduction="none"), batch_size=8, progress=False)
    assert table.steps == (0, 7, 14, 21)
    for t, model in enumerate(models):
        want = [nn.functional.cross_entropy(model(X[i : i + 1]), y[i : i + 1]).item() for i in range(len(y))]
        np.testing.assert_allclose(table.values[t].numpy(), want, rtol=1e-5, atol=1e-6)


def test_non_differentiable_zero_one_loss_and_dataset_input(setup):
    folder, models, X, y = setup
    zero_one = lambda out, target: (out.argmax(dim=1) != target).float()  # noqa: E731
    dataset = torch.utils.data.TensorDataset(X, y)
    table = compute_loss_table(_factory, folder, dataset, zero_one, example_ids=np.arange(100, 137), progress=False)
    for t, model in enumerate(models):
        want = np.array([float(model(X[i : i + 1]).argmax().item() != y[i].item()) for i in range(len(y))])
        np.testing.assert_array_equal(table.values[t].numpy(), want)
    assert table.example_ids[0] == 100


def test_loss_fn_must_return_one_value_per_example(setup):
    folder, _, X, y = setup
    with pytest.raises(InputError, match="one value per example"):
        compute_loss_table(_factory, folder, (X, y), nn.CrossEntropyLoss(), progress=False)


def test_parquet_round_trip(tmp_path):
    table = LossTable(np.array([5, 3, 9]), (0, 4), torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]))
    back = read_loss_table(table.write(tmp_path / "t.parquet"), expected_steps=[0, 4])
    assert back.steps == (0, 4)
    np.testing.assert_array_equal(back.example_ids, [5, 3, 9])
    torch.testing.assert_close(back.values, table.values)
    assert pq.read_schema(tmp_path / "t.parquet").field("step_4").type == pa.float32()


def _write_raw(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    "columns, expected_steps, message",
    [
        ({"example_id": [1, 2], "step_0": [0.1, float("nan")]}, None, "column 'step_0' has 1 NaN/inf values .*example_id 2"),
        ({"example_id": [1, 2], "step_0": [float("inf"), 0.0]}, None, "column 'step_0' has 1 NaN/inf"),
        ({"example_id": [1, 1], "step_0": [0.1, 0.2]}, None, "column .example_id. has duplicate ids"),
        ({"id": [1, 2], "step_0": [0.1, 0.2]}, None, "has no 'example_id' column"),
        ({"example_id": [1, 2], "loss": [0.1, 0.2]}, None, r"\['loss'\] are not of the form"),
        ({"example_id": [1, 2], "step_5": [0.1, 0.2], "step_2": [0.1, 0.2]}, None, "not in increasing step order"),
        ({"example_id": [1, 2], "step_0": [0.1, 0.2]}, [0, 10], r"missing columns \['step_10'\]"),
        ({"example_id": [1, 2], "step_0": [0.1, 0.2], "step_3": [0.1, 0.2]}, [0], r"extra columns \['step_3'\]"),
        ({"example_id": [1, 2], "step_0": [0.1, 0.2], "step_3": [0.5, None]}, None, "column 'step_3' has 1 missing"),
        ({"example_id": [1.0, 2.0], "step_0": [0.1, 0.2]}, None, "'example_id' must hold integers"),
        ({"example_id": [1, 2], "step_0": ["a", "b"]}, None, "'step_0' must be floating point"),
    ],
)
@pytest.mark.parametrize("reader", [read_loss_table, check_loss_table])
def test_bad_loss_tables_are_refused_by_name(tmp_path, columns, expected_steps, message, reader):
    """Reading a table whole and checking it a column at a time (the writer's check) refuse alike."""
    path = _write_raw(tmp_path / "bad.parquet", columns)
    with pytest.raises(InputError, match=f"loss table .*bad.parquet: .*{message}"):
        reader(path, expected_steps)


def test_not_parquet_is_refused(tmp_path):
    (tmp_path / "x.parquet").write_text("example_id,step_0\n1,0.1\n")
    with pytest.raises(InputError, match="x.parquet: not a readable parquet file"):
        read_loss_table(tmp_path / "x.parquet")
