"""A retrained run's MLflow name tells its parent and its round."""

from __future__ import annotations

import pytest

from z0inf_pipeline.tracking.logger import retrained_run_name


@pytest.mark.parametrize(
    "parent, child",
    [
        ("digits-mlp-noise0.1", "digits-mlp-noise0.1 · retrain 1"),
        ("digits-mlp-noise0.1 · retrain 1", "digits-mlp-noise0.1 · retrain 2"),
        ("a · retrain 9", "a · retrain 10"),
        ("retrain 3", "retrain 3 · retrain 1"),
        (None, "run · retrain 1"),
    ],
)
def test_retrained_run_names_tell_the_round(parent, child):
    assert retrained_run_name(parent) == child
