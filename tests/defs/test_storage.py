"""The IO manager: each asset's output in its run's folder (RunLayout), on the local disk by default
or on any fsspec file system by URL, logged to the source MLflow run when asked."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from z0inf_pipeline.definitions import resources
from z0inf_pipeline.defs.assets import ALL_ASSETS, loss_tables, training_run, weight_gram
from z0inf_pipeline.defs.checks import ALL_CHECKS
from z0inf_pipeline.defs.jobs import ALL_JOBS
from z0inf_pipeline.defs.resources import ComputeResource, MlflowResource
from z0inf_pipeline.defs.storage import LossShardsIOManager, LossTables, RunOutputsIOManager, StoredTable, asset_files
from z0inf_pipeline.influence import read_loss_table
from z0inf_pipeline.influence.analysis import read_gram
from z0inf_pipeline.review import FlagPolicy, RunLayout, read_review_queue, write_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.review.lineage import CALIBRATED_ON_KEY
from z0inf_pipeline.tracking import fetch_run, train_and_log

from .conftest import TINY


def _materialize(instance, run_id: str, io_manager: RunOutputsIOManager, source: str = "auto"):
    if not instance.has_dynamic_partition("mlflow_runs", run_id):
        instance.add_dynamic_partitions("mlflow_runs", [run_id])
    return dg.materialize(
        [training_run, loss_tables, weight_gram],
        partition_key=run_id,
        instance=instance,
        resources={
            "mlflow": MlflowResource(),
            "compute": ComputeResource(device="cpu"),
            "run_outputs": io_manager,
            "loss_shards": LossShardsIOManager(base_url=io_manager.base_url),
        },
        run_config={"ops": {"loss_tables": {"config": {"source": source}}}},
    )


def test_outputs_on_an_fsspec_url_land_in_the_run_layout_there(instance, contract_run, tracking_uri):
    base = "memory://z0inf-test-outputs"
    io_manager = RunOutputsIOManager(mlflow=MlflowResource(), base_url=base, log_to_mlflow=False)
    assert _materialize(instance, contract_run, io_manager).success

    layout = RunLayout.for_run(contract_run, base)
    assert str(layout.root) == f"{base}/runs/{contract_run}"
    for path in (layout.examples, layout.train_losses, layout.test_losses, layout.predictions, layout.gram):
        assert path.exists(), path
    assert not RunLayout.for_run(contract_run, outputs_base()).root.exists()  # nothing on the local disk
    assert MlflowClient(tracking_uri).list_artifacts(contract_run, "z0inf") == []  # logging switched off

    # Read back through the handles the IO manager gives downstream assets: the same numbers as the run's
    # own loss table, read here directly from the MLflow download.
    run = fetch_run(contract_run, tracking_uri=tracking_uri)
    stored = LossTables.load(asset_files(layout, "loss_tables"))
    assert isinstance(stored.train, StoredTable) and stored.train.columns[0] == "example_id"
    original = read_loss_table(run.train_losses)
    np.testing.assert_array_equal(stored.train_table().example_ids, original.example_ids)
    np.testing.assert_allclose(stored.train_table().values.numpy(), original.values.numpy(), rtol=1e-4, atol=1e-5)
    with layout.examples.open("rb") as handle:
        pd.testing.assert_frame_equal(pd.read_parquet(handle), pd.read_parquet(run.examples))
    layout.root.fs.rm(str(layout.root), recursive=True)


def test_local_outputs_are_logged_to_the_source_run_and_stale_files_removed(instance, contract_run, tracking_uri):
    io_manager = RunOutputsIOManager(mlflow=MlflowResource())
    assert _materialize(instance, contract_run, io_manager).success
    layout = RunLayout.for_run(contract_run, outputs_base())
    assert layout.predictions.exists()
    steps, gram = read_gram(layout.gram)
    assert steps == tuple(fetch_run(contract_run, tracking_uri=tracking_uri).steps)
    assert np.allclose(gram.numpy(), gram.numpy().T)
    client = MlflowClient(tracking_uri)
    assert {a.path for a in client.list_artifacts(contract_run, "z0inf/loss_tables")} == {
        "z0inf/loss_tables/train.parquet",
        "z0inf/loss_tables/test.parquet",
        "z0inf/loss_tables/predictions.parquet",
    }
    # No temporary files are left beside the outputs.
    assert not [p for p in layout.root.rglob("*") if p.name.startswith(".")]

    # Logged tables carry no predictions: the earlier predictions file must not outlive them.
    assert _materialize(instance, contract_run, io_manager, source="logged").success
    assert not layout.predictions.exists() and layout.train_losses.exists()


def test_loading_an_output_that_was_never_materialised_names_it(contract_run):
    io_manager = RunOutputsIOManager(mlflow=MlflowResource())
    context = dg.build_input_context(asset_key=dg.AssetKey("self_influence"), partition_key=contract_run)
    with pytest.raises(dg.Failure, match="self_influence of run .*self_influence.parquet does not exist"):
        io_manager.load_input(context)


def test_a_retrained_run_inherits_the_cutoff_from_a_base_set_only_in_dagster_config(
    instance, tracking_uri, tmp_path, monkeypatch
):
    """The outputs base comes from the IO manager's config alone (no $Z0INF_OUTPUTS_URL): the child's
    review_queue still finds the parent's queue there and keeps its cut-off."""
    monkeypatch.delenv("Z0INF_OUTPUTS_URL", raising=False)
    base = tmp_path / "outputs-set-in-dagster-config"
    parent = train_and_log(TINY, tracking_uri=tracking_uri)
    child = train_and_log(TINY, tracking_uri=tracking_uri, parent_run_id=parent)
    policy, cutoff = FlagPolicy(), 123.456  # above every score: a fresh fit could not land on it
    write_review_queue(pd.DataFrame({"example_id": [0]}), RunLayout.for_run(parent, base).review_queue,
                       {"policy": policy.to_dict(), "cutoff": cutoff, CALIBRATED_ON_KEY: parent})
    instance.add_dynamic_partitions("mlflow_runs", [child])
    io_manager = RunOutputsIOManager(mlflow=MlflowResource(), base_url=str(base), log_to_mlflow=False)
    defs = dg.Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=ALL_JOBS,
                          resources=resources(run_outputs=io_manager, compute=ComputeResource(device="cpu")))
    result = defs.resolve_job_def("influence_job").execute_in_process(instance=instance, partition_key=child)
    assert result.success
    queue, info = read_review_queue(RunLayout.for_run(child, base).review_queue)
    assert (info["cutoff"], info[CALIBRATED_ON_KEY], len(queue)) == (cutoff, parent, 0)
    assert not RunLayout.for_run(child, outputs_base()).root.exists()  # nothing where the environment points
