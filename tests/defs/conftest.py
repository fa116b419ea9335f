"""Fixtures for the Dagster layer: a real Dagster instance on disk and a tiny real contract run in MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from z0inf_pipeline.review import FlagPolicy
from z0inf_pipeline.tracking import train_and_log
from z0inf_pipeline.training import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small enough for seconds, noisy enough that the review gate has something to block.
TINY = TrainConfig(epochs=3, checkpoints=4, hidden=(16,), label_noise=0.1, noise_seed=3)
# The assets downstream of training_run, in flow order (written out here, not read from the code).
STAGES = [
    "loss_tables",
    "weight_gram",
    "self_influence",
    "train_test_influence",
    "review_queue",
    "curated_training_set",
    "retrained_run",
    "model_promotion",
]


def flagged_by_default_policy(scores: pd.DataFrame, examples: pd.DataFrame, train_losses: pd.DataFrame,
                              test_losses: pd.DataFrame) -> set[int]:
    """The example ids the default flag policy flags in a fresh run, recomputed here (not the pipeline's
    code, one threshold at a time): at each checkpoint after step 0 and each training loss x >= ln 2, the
    share of training losses above x minus the share of test losses above x; the largest gap times N
    (rounded) is the count, unless the gap exceeds sqrt(ln(2 / 0.05) / 2 (1/N + 1/M)): then the larger of
    that and the fewer of confident learning's count (examples whose exp(-mean_loss) leaves room for another
    class's mean exp(-mean_loss); labels from the run's ``examples`` table) and the training losses above
    that x. Highest mean_loss first, at most ``max_flagged``."""
    policy = FlagPolicy()
    assert (policy.score, policy.method) == ("mean_loss", "held_out"), "defaults changed"
    best = (-1.0, 0)
    for column in [c for c in train_losses.columns if c.startswith("step_") and c != "step_0" and c in test_losses]:
        train, test = train_losses[column].to_numpy(), test_losses[column].to_numpy()
        for x in train[train >= np.log(2)]:
            gap = (train > x).mean() - (test > x).mean()
            if gap > best[0]:
                best = (gap, int((train > x).sum()))
    gap, above = best
    n, m = len(train_losses), len(test_losses)
    x = scores["mean_loss"].to_numpy(dtype=np.float64)
    count = max(0, round(gap * n))
    if gap > np.sqrt(np.log(2 / 0.05) / 2 * (1 / n + 1 / m)):
        train = examples[examples["split"] == "train"].set_index("example_id")
        p, labels = np.exp(-x), train.loc[scores["example_id"], "label"].to_numpy()
        class_mean = {c: p[labels == c].mean() for c in np.unique(labels)}
        confident = sum(p[i] <= 1 - min(t for c, t in class_mean.items() if c != labels[i]) for i in range(len(x)))
        count = max(count, min(int(confident), above))
    count = min(count, policy.max_flagged)
    return set(scores["example_id"].to_numpy()[np.argsort(-x, kind="stable")[:count]].tolist())


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "dagster_server: starts a real dagster-webserver subprocess on 127.0.0.1 (slow, ~10-30 s)"
    )


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    """$DAGSTER_HOME in tmp_path, configured by the project's own dagster_home/dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home):
    """The real SQLite-backed Dagster instance of that DAGSTER_HOME."""
    with dg.DagsterInstance.get() as inst:
        yield inst


@pytest.fixture
def contract_run(tracking_uri) -> str:
    """A FINISHED contract run: digits, 10% flipped labels, 4 checkpoints."""
    return train_and_log(TINY, tracking_uri=tracking_uri)


def execute(instance, job: str, run_id: str, run_config: dict | None = None):
    """Run one of the project's jobs for ``run_id`` in this process, registering the partition first."""
    from z0inf_pipeline.definitions import defs

    if not instance.has_dynamic_partition("mlflow_runs", run_id):
        instance.add_dynamic_partitions("mlflow_runs", [run_id])
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=run_id, run_config=run_config or {}, raise_on_error=False
    )
