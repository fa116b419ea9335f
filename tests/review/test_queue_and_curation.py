"""Review queue contents and curation (drops removed, relabels applied, recipe updated)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.review import (
    FlagPolicy,
    build_review_queue,
    curate,
    detection_quality,
    flag_scores,
    retrain_config,
)
from z0inf_pipeline.training import TrainConfig

IDS = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], dtype=np.int64)


def examples() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "example_id": IDS,
            "label": np.arange(10) % 3,
            "original_label": np.arange(10) % 3,
            "flipped": np.isin(IDS, [12, 17]),
        }
    )


def decisions(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["example_id", "action", "label"])
    frame["label"] = frame["label"].astype("Int64")
    return frame


def test_queue_holds_flagged_examples_with_scores_labels_predictions_and_losses():
    scores = pd.DataFrame({"example_id": IDS, "self_influence": [1, 2, 30, 3, 4, 5, 6, 20, 7, 8.0]})
    losses = pd.DataFrame(
        {
            "example_id": IDS[::-1],
            "step_0": np.arange(10, dtype=np.float32),
            "step_4": np.arange(10, dtype=np.float32) * 2,
        }
    )
    predictions = pd.DataFrame(
        {"example_id": IDS, "predicted_label": (np.arange(10) + 1) % 3, "confidence": np.linspace(0.5, 0.9, 10)}
    )
    flags = flag_scores(scores["self_influence"].to_numpy(), FlagPolicy(method="quantile", quantile=0.8))
    queue = build_review_queue(scores, flags, examples(), losses, predictions, decisions([(17, "drop", None)]))

    assert queue["example_id"].tolist() == [12, 17]  # highest self-influence first
    assert queue["rank"].tolist() == [1, 2]
    assert queue["self_influence"].tolist() == [30.0, 20.0]
    assert queue["label"].tolist() == [2 % 3, 7 % 3]
    assert queue["predicted_label"].tolist() == [3 % 3, 8 % 3]
    # losses were given in reverse id order: id 12 is row 7 of that frame
    np.testing.assert_array_equal(queue["loss_trajectory"][0], [7.0, 14.0])
    assert queue["loss_last"].tolist() == [14.0, 4.0]
    assert queue["decision"].isna().tolist() == [True, False] and queue["decision"][1] == "drop"
    assert detection_quality(queue["example_id"], [12, 17, 13]) == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "flagged": 2, "flipped": 3, "true_positives": 2}
    )
    assert detection_quality([1], []) is None


def test_curation_drops_and_relabels():
    curated = curate(
        examples(),
        decisions([(11, "drop", None), (14, "relabel", 2), (15, "keep", None), (18, "drop", None)]),
        num_classes=3,
    )
    assert curated.dropped_ids == (11, 18)
    assert curated.relabels == {14: 2}
    frame = curated.frame.set_index("example_id")
    assert sorted(frame.index) == sorted(set(IDS) - {11, 18})
    assert frame.loc[14, "label"] == 2 and frame.loc[14, "observed_label"] == 4 % 3
    assert frame.loc[16, "label"] == 6 % 3
    assert frame.loc[15, "action"] == "keep"


def test_curation_refuses_decisions_on_unknown_ids_and_labels():
    with pytest.raises(InputError, match="not training examples"):
        curate(examples(), decisions([(99, "drop", None)]))
    with pytest.raises(InputError, match="outside the 3 classes"):
        curate(examples(), decisions([(12, "relabel", 7)]), num_classes=3)


def test_retrain_config_keeps_earlier_curation_rounds():
    parent = TrainConfig(epochs=2, checkpoints=3, exclude_ids=(1,), relabels=((2, 0), (3, 1)))
    curated = curate(examples(), decisions([(11, "drop", None), (12, "relabel", 1)]))
    child = retrain_config(parent, curated)
    assert child.exclude_ids == (1, 11)
    assert child.relabels == ((2, 0), (3, 1), (12, 1))
    assert (child.epochs, child.checkpoints) == (2, 3)
