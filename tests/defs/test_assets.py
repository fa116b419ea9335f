"""Assets and their helpers on in-memory inputs: invoked directly with ``build_asset_context`` or run
with ``materialize_to_memory``, no IO manager and no files of the pipeline's own."""

from __future__ import annotations

import io

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from z0inf_pipeline.defs.assets import (
    INFLUENCE_ASSETS,
    loss_tables,
    self_influence,
    training_run,
    weight_gram,
)
from z0inf_pipeline.defs.config import EstimatorConfig, GramConfig
from z0inf_pipeline.defs.metadata import rounded
from z0inf_pipeline.defs.provenance import SOURCE_ATTR, content_hash, verify_scores
from z0inf_pipeline.defs.resources import ComputeResource, DecisionStoreResource, MlflowResource
from z0inf_pipeline.defs.storage import LossTables
from z0inf_pipeline.review import RunLayout
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import fetch_run, train_and_log

from .conftest import TINY, flagged_by_default_policy


def _value(output):
    return output.value if isinstance(output, dg.Output) else output


def test_logged_loss_tables_and_learning_rate_eta_on_in_memory_inputs(tracking_uri):
    """Constant learning rate lr: eta='learning_rate' weighs every checkpoint by lr, so its scores are
    exactly lr times the uniform ones (an eta that is ignored would leave them equal)."""
    recipe = TINY.replace(schedule="constant", lr=0.05)
    run_id = train_and_log(recipe, tracking_uri=tracking_uri)
    mlflow, compute = MlflowResource(), ComputeResource(device="cpu")
    run = fetch_run(run_id, tracking_uri=tracking_uri)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("mlflow_runs", [run_id])
        with dg.build_asset_context(partition_key=run_id, instance=instance) as context:
            examples = _value(training_run(context, mlflow=mlflow))
            pd.testing.assert_frame_equal(examples, pd.read_parquet(run.examples))

            tables = dg.materialize_to_memory(
                [training_run, loss_tables],
                partition_key=run_id,
                instance=instance,
                resources={"mlflow": mlflow, "compute": compute},
                run_config={"ops": {"loss_tables": {"config": {"source": "logged"}}}},
            ).output_for_node("loss_tables")
            assert isinstance(tables, LossTables) and tables.predictions is None
            logged = pd.read_parquet(run.train_losses)
            pd.testing.assert_frame_equal(tables.frame("train"), logged, check_dtype=False)
            assert tables.frame("test")["example_id"].tolist() == pd.read_parquet(run.test_losses)["example_id"].tolist()

            gram = _value(weight_gram(context, GramConfig(), mlflow=mlflow, compute=compute))
            assert gram.steps == tuple(run.steps)

            def scores(eta: str) -> np.ndarray:
                frame = _value(
                    self_influence(
                        context,
                        EstimatorConfig(eta=eta),
                        loss_tables=tables,
                        weight_gram=gram,
                        mlflow=mlflow,
                        compute=compute,
                    )
                )
                assert frame["example_id"].tolist() == logged["example_id"].tolist()
                return frame["self_influence"].to_numpy()

            uniform, weighted = scores("uniform"), scores("learning_rate")
    assert np.abs(uniform).max() > 0
    # float32 losses: agreement to float32 rounding (an ignored eta would be off by a factor of 20)
    np.testing.assert_allclose(weighted, recipe.lr * uniform, rtol=2e-6, atol=0)
    # Nothing was written where the pipeline keeps its outputs: invocation passed values only.
    root = RunLayout.for_run(run_id, outputs_base()).root  # in memory: only the GX validations are stored, in the run's gx/
    assert not root.exists() or [p.name for p in root.iterdir()] == ["gx"]


def test_flagged_grid_is_absent_for_tabular_data(tracking_uri):
    """breast_cancer rows are not images: the queue and histogram are made, the image grid is not."""
    run_id = train_and_log(TINY.replace(dataset="breast_cancer"), tracking_uri=tracking_uri)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("mlflow_runs", [run_id])
        result = dg.materialize_to_memory(
            INFLUENCE_ASSETS,
            partition_key=run_id,
            instance=instance,
            resources={
                "mlflow": MlflowResource(),
                "compute": ComputeResource(device="cpu"),
                "decisions": DecisionStoreResource(),
            },
        )
    assert result.success
    queue = result.output_for_node("review_queue")
    tables = result.output_for_node("loss_tables")
    expected = flagged_by_default_policy(result.output_for_node("self_influence"), result.output_for_node("training_run"),
                                         tables.frame("train"), tables.frame("test"))
    assert set(queue.queue["example_id"]) == expected and len(expected) > 0
    assert queue.flagged_grid is None
    assert Image.open(io.BytesIO(queue.histogram)).format == "PNG"
    metadata = next(
        e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key.to_user_string() == "review_queue"
    )
    assert "flagged_examples" not in metadata and "data:image/png;base64," in metadata["flag_score_histogram"].value
    root = RunLayout.for_run(run_id, outputs_base()).root  # in memory: only the GX validations are stored, in the run's gx/
    assert not root.exists() or [p.name for p in root.iterdir()] == ["gx"]


@pytest.mark.parametrize(
    "value, expected",
    [(0.10022271714922049, 0.1), (3417.2, 3420.0), (-0.0012345, -0.00123), (0.0, 0.0), (7, 7.0)],
)
def test_numbers_are_rounded_to_three_significant_digits(value, expected):
    assert rounded(value) == expected


def test_scores_that_miss_training_examples_are_refused():
    scores = pd.DataFrame({"example_id": [1, 2, 4], "self_influence": [0.1, 0.2, 0.3]})
    with dg.DagsterInstance.ephemeral() as instance:
        verify_scores(instance, "abc123", scores, np.array([1, 2, 4]))  # just computed, complete: accepted
        missing = r"\(in memory\) of run abc123: cover 3 of 4 training examples \(missing ids \[3\]\)"
        with pytest.raises(dg.Failure, match=missing):
            verify_scores(instance, "abc123", scores, np.array([1, 2, 3, 4]))
        # Read from storage, but no passing check recorded for the run: refused, naming the file.
        stored = scores.copy()
        stored.attrs[SOURCE_ATTR] = "/data/runs/abc123/self_influence.parquet"
        with pytest.raises(dg.Failure, match="/data/runs/abc123/self_influence.parquet of run abc123: no passing"):
            verify_scores(instance, "abc123", stored, np.array([1, 2, 4]))
    assert content_hash(scores) == content_hash(scores.copy()) != content_hash(scores.iloc[::-1])
