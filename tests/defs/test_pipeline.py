"""The whole asset graph, materialised in-process for one real MLflow run on a real Dagster instance."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from dagster._core.event_api import PartitionKeyFilter
from mlflow import MlflowClient

from z0inf_pipeline.definitions import defs
from z0inf_pipeline.influence import read_loss_table
from z0inf_pipeline.influence.analysis import TrainTestArguments
from z0inf_pipeline.review import RunLayout, read_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import fetch_run, train_and_log
from z0inf_pipeline.training import load_dataset

from .conftest import STAGES, TINY, execute, flagged_by_default_policy

GATE_OPEN = {"ops": {"review_queue": {"config": {"max_unreviewed_fraction": 1.0}}}}


def test_whole_graph_materialises_evaluates_every_check_and_logs_to_mlflow(instance, contract_run, tracking_uri):
    result = execute(instance, "pipeline_job", contract_run, GATE_OPEN)
    assert result.success

    materialised = {
        m.asset_key.to_user_string()
        for m in result.get_asset_materialization_events()
        for m in [m.event_specific_data.materialization]
    }
    assert materialised == {"training_run", *STAGES}
    evaluations = result.get_asset_check_evaluations()
    all_checks = set(defs.get_repository_def().asset_graph.asset_check_keys)
    assert {e.asset_check_key for e in evaluations} == all_checks
    assert len(evaluations) == len(all_checks) == 8
    # whether the retrained model became champion is a warning, not a data check
    failed = [(e.check_name, e.description) for e in evaluations if not e.passed]
    assert all(name == "retrained_model_is_champion" for name, _ in failed), failed

    layout = RunLayout.for_run(contract_run, outputs_base())
    client = MlflowClient(tracking_uri)
    # Every GX check links to its stored validation and its Data Docs page, and the MLflow run holds them.
    docs_root = layout.gx_folder / "uncommitted" / "data_docs" / "local_site"
    for evaluation in evaluations:
        # each validation's page and stored result (the gate: the flagging page), linked by file name in Markdown
        shown = [v.value for k, v in evaluation.metadata.items() if k in ("gx_validations", "data_docs_flagging")]
        links = [link for text in shown for link in re.findall(r"\[([^]]+)\]\(file://([^)]+)\)", text)]
        assert all(Path(url).name == name and Path(url).is_file() for name, url in links)
        pages = [url for _, url in links if url.endswith(".html")]
        if evaluation.check_name in ("gram_is_valid", "retrained_model_is_champion"):
            assert not pages  # checked in numpy (the Gram; the promotion's bootstrap): no table to validate
            continue
        assert pages and all(Path(p).is_file() and Path(p).is_relative_to(docs_root) for p in pages)
        logged = Path(pages[0]).relative_to(layout.gx_folder).parent.as_posix()
        assert {Path(a.path).name for a in client.list_artifacts(contract_run, f"gx/{logged}")} >= {Path(pages[0]).name}
    assert client.list_artifacts(contract_run, "gx/uncommitted/data_docs/local_site/static/styles")
    logged = {a.path for a in client.list_artifacts(contract_run, "z0inf")}
    assert logged == {f"z0inf/{stage}" for stage in ["training_run", *STAGES]}
    assert {a.path for a in client.list_artifacts(contract_run, "z0inf/review_queue")} >= {
        "z0inf/review_queue/review_queue.parquet",
        "z0inf/review_queue/flag_score_histogram.png",
        "z0inf/review_queue/flagged_examples.png",
        "z0inf/review_queue/review_sheet.html",  # MLflow previews HTML and CSV, not parquet
        "z0inf/review_queue/review_queue.csv",
        "z0inf/review_queue/review_queue.html",
    }

    # Summary metrics on the source run, against numbers recomputed here from the parquet outputs.
    metrics = client.get_run(contract_run).data.metrics
    scores = pd.read_parquet(layout.self_influence)
    si = scores["self_influence"].to_numpy()
    expected_flagged = flagged_by_default_policy(scores, pd.read_parquet(layout.examples),
                                                 pd.read_parquet(layout.train_losses), pd.read_parquet(layout.test_losses))
    assert metrics["z0inf.self_influence_q90"] == pytest.approx(np.quantile(si, 0.9))
    assert metrics["z0inf.self_influence_max"] == pytest.approx(si.max())
    assert metrics["z0inf.flagged_fraction"] == pytest.approx(len(expected_flagged) / len(si))
    queue, info = read_review_queue(layout.review_queue)
    assert set(queue["example_id"]) == expected_flagged
    assert info["training_examples"] == len(si)

    # Precision / recall against the label flips, recomputed from the dataset loader (not the run).
    bundle = load_dataset(TINY.dataset, seed=TINY.seed, test_fraction=TINY.test_fraction, label_noise=TINY.noise)
    flipped = set(bundle.flipped_ids.tolist())
    hits = len(expected_flagged & flipped)
    assert metrics["z0inf.flag_precision"] == pytest.approx(hits / len(expected_flagged))
    assert metrics["z0inf.flag_recall"] == pytest.approx(hits / len(flipped))
    assert hits / len(expected_flagged) > 0.3  # far above the 10% a random pick would reach

    # Loss tables recomputed from the checkpoints agree with the ones logged during training.
    run = fetch_run(contract_run, tracking_uri=tracking_uri)
    recomputed, original = read_loss_table(layout.train_losses), read_loss_table(run.train_losses)
    assert recomputed.steps == original.steps == tuple(run.steps)
    np.testing.assert_array_equal(recomputed.example_ids, original.example_ids)
    np.testing.assert_allclose(recomputed.values.numpy(), original.values.numpy(), rtol=1e-4, atol=1e-5)

    # Each queue row carries the example's label, prediction and its loss at every checkpoint.
    labels = dict(zip(bundle.train.example_ids.tolist(), bundle.train.labels.tolist()))
    assert [labels[i] for i in queue["example_id"]] == queue["label"].tolist()
    rows = pd.Index(original.example_ids).get_indexer(queue["example_id"])
    np.testing.assert_allclose(np.stack(queue["loss_trajectory"]), recomputed.values.numpy()[:, rows].T, rtol=1e-6)
    predictions = pd.read_parquet(layout.predictions).set_index("example_id")
    assert queue["predicted_label"].tolist() == predictions.loc[queue["example_id"], "predicted_label"].tolist()
    test_rows = predictions[predictions["split"] == "test"]
    accuracy = client.get_metric_history(contract_run, "test_accuracy")
    assert (test_rows["predicted_label"] == test_rows["label"]).mean() == pytest.approx(
        max(accuracy, key=lambda m: m.step).value, abs=1e-6
    )

    # No decisions, gate opened by config: the retrained run is the same recipe, tagged with its parent.
    child_id = pd.read_parquet(layout.retrained).at[0, "retrained_run_id"]
    child = client.get_run(child_id)
    assert child.data.tags["z0inf.parent_run_id"] == contract_run
    assert child.info.status == "FINISHED"


def test_materialisation_metadata_shows_queue_histogram_and_images(instance, contract_run, tracking_uri):
    other_run = train_and_log(TINY, tracking_uri=tracking_uri)
    result = execute(instance, "influence_job", contract_run)
    assert result.success
    queue_events = [
        m
        for m in result.get_asset_materialization_events()
        if m.event_specific_data.materialization.asset_key.to_user_string() == "review_queue"
    ]
    metadata = queue_events[0].event_specific_data.materialization.metadata
    preview = metadata["review_queue"]
    assert [c.name for c in preview.schema.columns][:6] == [
        "rank", "example_id", "flag_score", "percentile", "rank among all", "flagged_by"
    ]
    queue = read_review_queue(RunLayout.for_run(contract_run, outputs_base()).review_queue)[0]
    assert [r.data["example_id"] for r in preview.records] == queue["example_id"].head(len(preview.records)).tolist()
    run_name = MlflowClient(tracking_uri).get_run(contract_run).info.run_name
    assert metadata["mlflow_run_id"].value == contract_run and metadata["mlflow_run_name"].value == run_name
    # a local store: the link points at `make mlflow-ui`'s address, in the "Model training" view
    assert metadata["mlflow_run"].value.endswith(f"/runs/{contract_run}?workflowType=machine_learning")
    assert "make mlflow-ui" in metadata["mlflow_run_ui"].value
    assert metadata["flagged_fraction"].value == round(metadata["flagged_fraction"].value, 3)
    assert "data:image/png;base64," in metadata["flag_score_histogram"].value
    assert "data:image/png;base64," in metadata["flagged_examples"].value
    # a built-in recipe's data is rebuilt: train-test influence runs along random directions
    topk = next(m.event_specific_data.materialization.metadata for m in result.get_asset_materialization_events()
                if m.event_specific_data.materialization.asset_key.to_user_string() == "train_test_influence")
    assert topk["method"].value == "directions" and "fallback" not in topk
    assert topk["train_test_estimator"].value["directions"] == TrainTestArguments().directions
    # influence_job computes the scores and the queue but leaves the review gate to retrain_job.
    assert "review_gate" not in {e.check_name for e in result.get_asset_check_evaluations()}
    assert all(e.metadata["mlflow_run_id"].value == contract_run for e in result.get_asset_check_evaluations())

    # Checks are evaluated per run: the other run's partition has no evaluation of its own yet.
    instance.add_dynamic_partitions("mlflow_runs", [other_run])
    key = dg.AssetCheckKey(dg.AssetKey("self_influence"), "self_influence_is_valid")
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key
    assert latest([key], partition_filter=PartitionKeyFilter(key=contract_run))[key].partition == contract_run
    assert key not in latest([key], partition_filter=PartitionKeyFilter(key=other_run))


def test_zero_one_loss_tables_recomputed_on_the_compute_device(instance, contract_run, tracking_uri):
    """Z0-Inf needs no gradients: with loss=zero_one the loss tables are 0/1 errors of every checkpoint."""
    config = {"ops": {"loss_tables": {"config": {"source": "recompute", "loss": "zero_one"}}}}
    result = execute(instance, "influence_job", contract_run, config)
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    layout = RunLayout.for_run(contract_run, outputs_base())
    test = read_loss_table(layout.test_losses)
    assert set(np.unique(test.values.numpy())) <= {0.0, 1.0}
    # The last column's mean error is one minus the test accuracy the trainer logged at the last step.
    accuracy = MlflowClient(tracking_uri).get_metric_history(contract_run, "test_accuracy")
    last = max(accuracy, key=lambda m: m.step).value
    assert float(test.values[-1].mean()) == pytest.approx(1.0 - last, abs=1e-6)
