"""The loss tables recomputed in shards (one Dagster step per shard, Dagster's dynamic fan-out) are the
same bytes as the unsharded computation, for shard sizes that are and are not whole batches."""

from __future__ import annotations

import dagster as dg
import pytest

from z0inf_pipeline import definitions
from z0inf_pipeline.defs.assets import loss_tables, training_run
from z0inf_pipeline.defs.assets.loss_tables import shard_bounds
from z0inf_pipeline.defs.resources import ComputeResource
from z0inf_pipeline.defs.storage import LossTables, asset_files
from z0inf_pipeline.review import RunLayout
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import fetch_run
from z0inf_pipeline.training.reevaluate import final_predictions, rebuild_data, recompute_loss_tables

BATCH = 64


def test_shards_are_whole_batches_covering_every_example_once():
    assert shard_bounds(300, 100, 64) == [(0, 128), (128, 256), (256, 300)]
    assert shard_bounds(300, 1000, 64) == [(0, 300)]
    assert shard_bounds(128, 64, 64) == [(0, 64), (64, 128)]


@pytest.mark.parametrize("shard_size", [100, 256])
def test_sharded_loss_tables_are_byte_identical_to_the_unsharded_ones(
    instance, contract_run, tracking_uri, tmp_path, shard_size
):
    instance.add_dynamic_partitions("mlflow_runs", [contract_run])
    result = dg.materialize(
        [training_run, loss_tables],
        partition_key=contract_run,
        instance=instance,
        resources=definitions.resources(compute=ComputeResource(device="cpu", batch_size=BATCH)),
        run_config={"ops": {"loss_tables": {"config": {"source": "recompute", "shard_size": shard_size}}}},
    )
    assert result.success
    shard_steps = [
        e.step_key for e in result.all_events if e.is_step_success and ".compute_loss_shard[" in e.step_key
    ]
    run = fetch_run(contract_run, tracking_uri=tracking_uri)

    # The unsharded path, computed here directly: every split in one pass, written by the same writer.
    examples = result.output_for_node("training_run")
    data = rebuild_data(run.run_id, run.train_config, run.model_spec, examples)
    train, test = recompute_loss_tables(run.build_model, run.checkpoints, data, "cross_entropy", batch_size=BATCH)
    predictions = final_predictions(run.load_model(), data, batch_size=BATCH)
    files = {name: tmp_path / f"{name}.parquet" for name in ("train_losses", "test_losses", "predictions")}
    LossTables(train, test, predictions).write_into(files)

    expected_shards = sum(len(shard_bounds(len(s), shard_size, BATCH)) for s in (data.train, data.test))
    assert len(shard_steps) == expected_shards > 2
    stored = asset_files(RunLayout.for_run(contract_run, outputs_base()), "loss_tables")
    for name, path in files.items():
        assert stored[name].read_bytes() == path.read_bytes(), name
