"""`z0inf demo` stops at the review gate and says how to go on; `z0inf review` and `z0inf materialize`
then take the run through retraining, on the persistent DAGSTER_HOME instance."""

from __future__ import annotations

import re

import dagster as dg
import pandas as pd

from z0inf_pipeline.cli import main
from z0inf_pipeline.cli.pipeline import DEMO_CONFIG, SIMULATED_REVIEWER
from z0inf_pipeline.defs.config import TrainingConfig
from z0inf_pipeline.review import DecisionStore, RunLayout
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.training import TrainConfig
from z0inf_pipeline.tracking import fetch_run


def test_demo_then_review_then_materialize_retrain(dagster_home, tracking_uri, capsys):
    assert main(["demo", "--stop-at-gate", "--epochs", "3", "--checkpoints", "4"]) == 0
    out = capsys.readouterr().out
    run_id = re.search(r"trained and logged MLflow run ([0-9a-f]{32})", out).group(1)
    assert "review gate BLOCKED" in out and "retraining did NOT run" in out
    assert f"z0inf review decide {run_id}" in out and "without --stop-at-gate" in out
    precision, recall = map(float, re.search(r"precision ([0-9.]+), recall ([0-9.]+)", out).groups())
    layout = RunLayout.for_run(run_id, outputs_base())
    examples = pd.read_parquet(layout.examples)
    queue = pd.read_parquet(layout.review_queue)
    flipped = set(examples.loc[examples["flipped"], "example_id"])
    hits = len(set(queue["example_id"]) & flipped)
    assert precision == round(hits / len(queue), 3) and recall == round(hits / len(flipped), 3)
    assert "stage timings" in out and re.search(r"\d+\.\d\d s  total", out)

    # The demo's runs are in the DAGSTER_HOME instance, where `dagster dev` shows them.
    with dg.DagsterInstance.get() as instance:
        jobs = [r.job_name for r in instance.get_runs()]
    assert sorted(jobs) == ["influence_job", "retrain_job"]

    assert main(["review", "list", "--run", run_id, "--limit", "5"]) == 0
    listing = capsys.readouterr().out
    assert f"{len(queue)} flagged example(s)" in listing and "review gate BLOCKED" in listing

    first = int(queue["example_id"].iloc[0])
    assert main(["review", "decide", run_id, str(first), "--action", "keep"]) == 0
    assert main(["review", "decide", run_id, "--flagged", "--action", "drop"]) == 0
    assert "review gate open" in capsys.readouterr().out
    current = DecisionStore.open().current(run_id).set_index("example_id")
    assert current.loc[first, "action"] == "keep" and (current["action"] == "drop").sum() == len(queue) - 1

    assert main(["materialize", "retrain", "--run", run_id]) == 0
    out = capsys.readouterr().out
    assert "[pass] review_gate" in out and "retrained MLflow run" in out
    summary = pd.read_parquet(layout.retrained).iloc[0]
    assert summary["dropped"] == len(queue) - 1
    assert summary["train_examples"] == (examples["split"] == "train").sum() - (len(queue) - 1)


def test_train_job_defaults_are_the_library_recipe_without_noise():
    assert TrainingConfig().settings(TrainConfig) == TrainConfig()
    assert TrainingConfig().label_noise == 0.0
    # noise is explicit: only the demo asks for it
    assert DEMO_CONFIG == TrainConfig().replace(label_noise=0.1)


def test_make_demo_leaves_round_two_pending_after_a_simulated_round_one(dagster_home, tracking_uri, capsys):
    """`make demo` runs `z0inf demo`: round 1 blocked, then decided by the simulated reviewer (injected flips
    relabelled to their label, the rest kept), the gated retrain passes, and the retrained run is analysed
    with flagged examples left PENDING for a person; the registry step says where the new version went."""
    assert main(["demo", "--epochs", "3", "--checkpoints", "4"]) == 0
    out = capsys.readouterr().out
    run_id = re.search(r"trained and logged MLflow run ([0-9a-f]{32})", out).group(1)
    assert "review gate BLOCKED" in out and "review gate open" in out and "Traceback" not in out
    assert "SIMULATED reviewer" in out
    layout = RunLayout.for_run(run_id, outputs_base())
    queue = pd.read_parquet(layout.review_queue)
    examples = pd.read_parquet(layout.examples).set_index("example_id")
    history = DecisionStore.open().history(run_id).set_index("example_id")
    assert set(history["reviewer"]) == {SIMULATED_REVIEWER} and sorted(history.index) == sorted(queue["example_id"])
    flipped = examples.loc[history.index, "flipped"]
    assert (history.loc[flipped, "action"] == "relabel").all() and (history.loc[~flipped, "action"] == "keep").all()
    relabelled = history[history["action"] == "relabel"]
    assert (relabelled["label"] == examples.loc[relabelled.index, "original_label"]).all()

    summary = pd.read_parquet(layout.retrained).iloc[0]
    child = fetch_run(summary["retrained_run_id"], tracking_uri=tracking_uri)
    assert child.tags["z0inf.parent_run_id"] == run_id and f"retrained MLflow run {child.run_id}" in out
    assert summary["relabelled"] == flipped.sum() and summary["dropped"] == 0
    pending = int(re.search(r"(\d+) PENDING for you", out).group(1))
    child_queue = pd.read_parquet(RunLayout.for_run(child.run_id, outputs_base()).review_queue)
    decided = set(history.index)
    assert pending == len(set(child_queue["example_id"]) - decided) and pending > 0
    assert re.search(r"model registry: models:/digits-mlp/2 -> @(champion|challenger)", out)
    with dg.DagsterInstance.get() as instance:
        assert sorted(r.job_name for r in instance.get_runs()) == [
            "influence_job", "influence_job", "retrain_job", "retrain_job"]


def test_the_shut_gate_notice_is_dropped_and_other_dagster_warnings_are_not():
    """Dagster's module loggers have no handler: Python prints their warnings through logging.lastResort,
    where the filter sits (no Dagster module named)."""
    import logging

    from z0inf_pipeline.cli.jobs import quiet_shut_gate_notice

    def record(logger: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(logger, logging.WARNING, __file__, 1, message, None, None)

    quiet_shut_gate_notice()
    quiet_shut_gate_notice()  # installed once
    assert len(logging.lastResort.filters) == len(set(map(type, logging.lastResort.filters)))
    notice = "Blocking asset check 'x' emitted no result in step 'c'; downstream step 'r' will proceed"
    assert not logging.lastResort.filter(record("dagster.any.module", notice))
    assert logging.lastResort.filter(record("dagster.any.module", "another dagster warning"))
    assert logging.lastResort.filter(record("z0inf_test", notice))  # not Dagster's: kept
