"""Train-test influence along random directions computed in shards (one Dagster step per shard of
training or test examples, Dagster's dynamic fan-out; the top-k streamed over the training shards) is
the same frame, exactly, as one shard, and the in-process analysis's top-k to float64 rounding."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from z0inf_pipeline import definitions
from z0inf_pipeline.defs.assets import loss_tables, train_test_influence, training_run, weight_gram
from z0inf_pipeline.defs.assets.loss_tables import shard_bounds
from z0inf_pipeline.defs.resources import ComputeResource
from z0inf_pipeline.defs.storage import StoredTable, asset_files
from z0inf_pipeline.influence.analysis import InfluenceAnalysis, InfluenceArguments, TrainTestArguments
from z0inf_pipeline.review import RunLayout
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import fetch_run
from z0inf_pipeline.training.reevaluate import forward_access, rebuild_data

BATCH = 64
# few directions: seconds on a CPU, and still a top-k with distinct scores to compare
TRAIN_TEST = {"directions": 16}


def _materialise(instance, run_id: str, shard_size: int):
    """training_run .. train_test_influence with projection shards of ``shard_size``: the stored top-k
    frame, the step keys of the shard steps that succeeded and the asset's metadata."""
    result = dg.materialize(
        [training_run, loss_tables, weight_gram, train_test_influence],
        partition_key=run_id,
        instance=instance,
        resources=definitions.resources(compute=ComputeResource(device="cpu", batch_size=BATCH, dtype="float64")),
        run_config={"ops": {"train_test_influence": {"config": {"shard_size": shard_size, "train_test": TRAIN_TEST}}}},
    )
    assert result.success
    steps = [e.step_key for e in result.all_events if e.is_step_success and ".compute_projection_shard[" in e.step_key]
    metadata = next(m.event_specific_data.materialization.metadata for m in result.get_asset_materialization_events()
                    if m.event_specific_data.materialization.asset_key.to_user_string() == "train_test_influence")
    stored = asset_files(RunLayout.for_run(run_id, outputs_base()), "train_test_influence")["topk"]
    return StoredTable(stored).read(), steps, metadata, result


def test_sharded_directions_give_the_one_shard_frame_exactly(instance, contract_run, tracking_uri):
    instance.add_dynamic_partitions("mlflow_runs", [contract_run])
    whole, whole_steps, whole_metadata, _ = _materialise(instance, contract_run, 10**6)
    sharded, sharded_steps, metadata, result = _materialise(instance, contract_run, 100)

    examples = result.output_for_node("training_run")
    sizes = [int((examples["split"] == split).sum()) for split in ("train", "test")]
    assert len(whole_steps) == 2  # one shard per split
    # 100 rounded up to whole batches of 64 (k = 10 fits one): shards of 128, several per split
    assert len(sharded_steps) == sum(len(shard_bounds(n, 100, BATCH)) for n in sizes) > 4
    assert (metadata["method"].value, metadata["shards"].value) == ("directions", len(sharded_steps))
    assert "fallback" not in metadata and whole_metadata["shards"].value == 2
    pd.testing.assert_frame_equal(sharded, whole, check_exact=True)

    # The in-process analysis (all examples in one pass, the whole factors in memory): the same top-k
    # scores; batches of 4096 instead of 64 change the last bits only (in float64: in float32 a loss
    # difference over a step of 1e-3 keeps ~4 digits, and which batch an example shares moves the rest).
    run = fetch_run(contract_run, tracking_uri=tracking_uri)
    tables = result.output_for_node("loss_tables")
    data = rebuild_data(run.run_id, run.train_config, run.model_spec, examples)
    train, test = tables.train_table(), tables.test_table()
    gram = result.output_for_node("weight_gram")
    analysis = InfluenceAnalysis(
        run.checkpoints, train, test, args=InfluenceArguments(parameters=list(gram.provenance.parameters)),
        gram=gram.matrix, train_test=TrainTestArguments(**TRAIN_TEST),
        forward=forward_access(run.build_model, data, train.example_ids, test.example_ids, dtype=torch.float64),
    )
    expected = analysis.topk_frame()
    assert analysis.train_test_method == ("directions", None)
    for column in ("test_example_id", "rank"):
        np.testing.assert_array_equal(sharded[column], expected[column])
    for column in ("proponent_score", "opponent_score"):
        np.testing.assert_allclose(sharded[column], expected[column], rtol=1e-9, atol=1e-12)
    assert (sharded["proponent_score"] > sharded["opponent_score"]).all()


@pytest.mark.parametrize("train_test", [{"method": "trajectory"}, {"directions": 8, "trajectory_weight": 0.5}])
def test_methods_that_need_every_training_example_at_once_run_in_one_step(
    instance, contract_run, train_test
):
    instance.add_dynamic_partitions("mlflow_runs", [contract_run])
    result = dg.materialize(
        [training_run, loss_tables, weight_gram, train_test_influence],
        partition_key=contract_run,
        instance=instance,
        resources=definitions.resources(compute=ComputeResource(device="cpu", batch_size=BATCH)),
        run_config={"ops": {"train_test_influence": {"config": {"shard_size": 100, "train_test": train_test}}}},
    )
    assert result.success
    assert not [e for e in result.all_events if e.step_key and ".compute_projection_shard[" in e.step_key]
    metadata = next(m.event_specific_data.materialization.metadata for m in result.get_asset_materialization_events()
                    if m.event_specific_data.materialization.asset_key.to_user_string() == "train_test_influence")
    assert metadata["method"].value == train_test.get("method", "directions") and metadata["shards"].value == 0
