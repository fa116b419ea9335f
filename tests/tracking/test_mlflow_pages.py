"""What people see in MLflow: retrained runs named after their parent and round, a link to the
model-training runs view, and small tables previewable as CSV and HTML."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from z0inf_pipeline.tracking import train_and_log
from z0inf_pipeline.tracking.logger import retrained_run_name
from z0inf_pipeline.review.artifacts import table_previews
from z0inf_pipeline.tracking.ui_links import experiment_runs_url, training_runs_url
from z0inf_pipeline.training import TrainConfig


@pytest.mark.parametrize(
    "parent, child",
    [
        ("digits-mlp-noise0.1", "digits-mlp-noise0.1 · retrain 1"),
        ("digits-mlp-noise0.1 · retrain 1", "digits-mlp-noise0.1 · retrain 2"),
        ("a · retrain 9", "a · retrain 10"),
        ("a · retrain 1 (2)", "a · retrain 2"),  # a second child of one parent
        ("retrain 3", "retrain 3 · retrain 1"),
        (None, "run · retrain 1"),
    ],
)
def test_retrained_run_names_tell_the_round(parent, child):
    assert retrained_run_name(parent) == child


def test_runs_of_one_recipe_get_names_unique_in_their_experiment(tracking_uri):
    from mlflow import MlflowClient

    config = TrainConfig(epochs=1, checkpoints=2, hidden=(4,))
    runs = [train_and_log(config, tracking_uri=tracking_uri) for _ in range(3)]
    client = MlflowClient(tracking_uri)
    names = [client.get_run(r).info.run_name for r in runs]
    assert names == ["digits-mlp", "digits-mlp (2)", "digits-mlp (3)"]


def test_training_runs_link_names_the_experiment_and_the_model_training_view(tracking_uri):
    assert training_runs_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert experiment_runs_url("http://h:5000", tracking_uri=tracking_uri).endswith("/#/experiments?workflowType=machine_learning")
    train_and_log(TrainConfig(epochs=1, checkpoints=2, hidden=(4,)), tracking_uri=tracking_uri)
    from mlflow import MlflowClient

    experiment_id = MlflowClient(tracking_uri).get_experiment_by_name("z0inf").experiment_id
    assert experiment_runs_url("http://h:5000", tracking_uri=tracking_uri) == training_runs_url("http://h:5000", experiment_id)


def test_table_previews_are_the_table_as_csv_and_rounded_html():
    frame = pd.DataFrame({"example_id": np.arange(5), "score": [0.10022271714922049, 1e-7, np.nan, 3.0, 12345.678],
                          "note": ["<b>", "a", None, "c", "d"]})
    files = table_previews(frame, "review_queue", max_rows=4)
    assert list(files) == ["review_queue.csv", "review_queue.html"]
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(files["review_queue.csv"])), frame.head(4).astype({"note": object}),
                                  check_dtype=False)
    text = files["review_queue.html"].decode("utf-8")
    assert "0.1002" in text and "0.10022271714922049" not in text and "1e-07" in text
    assert "&lt;b&gt;" in text and "<b>" not in text
    assert "first 4 of 5 rows" in text
