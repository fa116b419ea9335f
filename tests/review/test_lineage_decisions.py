"""No acknowledged decision is lost across retraining rounds: curation, both curation checks, the gate,
the CLI and the page read the same lineage decisions; a decision recorded while a retrain is in flight
is either applied to it or stays pending for the next round, and is never shown as applied when it
was not. Real MLflow, real Dagster instance, real decision store, the real CLI."""

from __future__ import annotations

import threading

import dagster as dg
import pandas as pd

from z0inf_pipeline.cli import main
from z0inf_pipeline.review import DecisionStore, RunLayout
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.review.run_review import RunReview
from z0inf_pipeline.tracking import fetch_run

from ..defs.conftest import contract_run, dagster_home, execute, instance  # noqa: F401 - fixtures


def _trained_ids(run_id: str, tracking_uri: str) -> set[int]:
    """The training ids the MLflow run itself logged (its own examples table, not the pipeline's outputs)."""
    examples = pd.read_parquet(fetch_run(run_id, tracking_uri=tracking_uri).examples)
    return set(examples.loc[examples["split"] == "train", "example_id"].astype(int))


def _child_of(run_id: str) -> str:
    return str(pd.read_parquet(RunLayout.for_run(run_id, outputs_base()).retrained).at[0, "retrained_run_id"])


def _unflagged(run_id: str, count: int) -> list[int]:
    """Training ids of the run that its queue did not flag (decisions on them leave the gate alone)."""
    layout = RunLayout.for_run(run_id, outputs_base())
    examples = pd.read_parquet(layout.examples)
    flagged = set(pd.read_parquet(layout.review_queue)["example_id"].astype(int))
    train = examples.loc[examples["split"] == "train", "example_id"].astype(int)
    return [i for i in train if i not in flagged][:count]


CURATION_CHECKS = ("review_gate", "curated_set_matches_decisions", "retrained_run_follows_curation")


def _curation_checks_pass(result) -> bool:
    """The gate and both curation checks ran and passed (the promotion check is a warning, not theirs)."""
    passed = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    return all(passed.get(name) for name in CURATION_CHECKS)


def test_parent_decision_recorded_after_its_retrain_is_applied_when_the_child_is_retrained(
    instance, contract_run, tracking_uri, capsys
):
    parent = contract_run
    assert execute(instance, "influence_job", parent).success
    assert main(["review", "decide", parent, "--flagged", "--action", "keep", "--reviewer", "t"]) == 0
    assert execute(instance, "retrain_job", parent).success
    child = _child_of(parent)
    assert execute(instance, "influence_job", child).success

    late = _unflagged(child, 2)
    assert main(["review", "decide", parent, *map(str, late), "--action", "drop", "--reviewer", "t"]) == 0
    child_queue = pd.read_parquet(RunLayout.for_run(child, outputs_base()).review_queue)["example_id"].astype(int).tolist()
    keep = [i for i in child_queue if i not in late] or _unflagged(child, 3)[2:]
    assert main(["review", "decide", child, *map(str, keep), "--action", "keep", "--reviewer", "t"]) == 0
    capsys.readouterr()
    assert main(["review", "list", "--run", child, "--limit", "0"]) == 0
    listing = capsys.readouterr().out
    assert "review gate open" in listing
    # The late drops are in force for the child, not yet applied (the child trained with them).
    assert set(late) <= _trained_ids(child, tracking_uri)
    in_force = RunReview.open(child, outputs_base()).decisions(DecisionStore.open()).set_index("example_id")
    assert in_force.loc[late, "action"].tolist() == ["drop", "drop"]
    assert in_force.loc[late, "decided_on_run"].tolist() == [parent, parent]
    assert in_force.loc[late, "applied_in"].isna().all()

    result = execute(instance, "retrain_job", child)
    assert result.success and _curation_checks_pass(result)
    grandchild = _child_of(child)
    trained = _trained_ids(grandchild, tracking_uri)
    assert not set(late) & trained  # the parent's late drops reached the grandchild's training
    summary = pd.read_parquet(RunLayout.for_run(child, outputs_base()).retrained).iloc[0]
    assert summary["dropped"] == len(late)
    after = RunReview.open(child, outputs_base()).decisions(DecisionStore.open()).set_index("example_id")
    assert after.loc[late, "applied_in"].tolist() == [grandchild, grandchild]


def test_decision_recorded_after_the_curation_snapshot_stays_pending_for_the_next_round(
    instance, contract_run, tracking_uri
):
    """The deterministic form of the race: the curated set is taken, a drop is recorded, then the
    retrained run is trained from that curated set."""
    run = contract_run
    assert execute(instance, "influence_job", run).success
    assert main(["review", "decide", run, "--flagged", "--action", "keep", "--reviewer", "t"]) == 0
    early, late = _unflagged(run, 2)
    assert main(["review", "decide", run, str(early), "--action", "drop", "--reviewer", "t"]) == 0
    from z0inf_pipeline.definitions import defs

    job = defs.resolve_job_def("retrain_job")
    curated = job.execute_in_process(
        instance=instance, partition_key=run, raise_on_error=False,
        asset_selection=[dg.AssetKey("review_queue"), dg.AssetKey("curated_training_set")],
    )
    assert curated.success
    assert main(["review", "decide", run, str(late), "--action", "drop", "--reviewer", "t"]) == 0
    retrained = job.execute_in_process(
        instance=instance, partition_key=run, raise_on_error=False, asset_selection=[dg.AssetKey("retrained_run")]
    )
    assert retrained.success
    assert {e.check_name: e.passed for e in retrained.get_asset_check_evaluations()}["retrained_run_follows_curation"]

    child = _child_of(run)
    trained = _trained_ids(child, tracking_uri)
    assert early not in trained and late in trained
    in_force = RunReview.open(run, outputs_base()).decisions(DecisionStore.open()).set_index("example_id")
    assert in_force.at[early, "applied_in"] == child
    assert pd.isna(in_force.at[late, "applied_in"])  # never shown as applied
    # ... and it is in force for the child, so its next round applies it.
    assert execute(instance, "influence_job", child).success
    for_child = RunReview.open(child, outputs_base()).decisions(DecisionStore.open()).set_index("example_id")
    assert for_child.at[late, "action"] == "drop" and pd.isna(for_child.at[late, "applied_in"])


def test_decisions_recorded_while_a_retrain_runs_are_applied_or_pending_never_lost(
    instance, contract_run, tracking_uri
):
    run = contract_run
    assert execute(instance, "influence_job", run).success
    assert main(["review", "decide", run, "--flagged", "--action", "keep", "--reviewer", "t"]) == 0
    candidates = _unflagged(run, 400)
    store = DecisionStore.open()
    acknowledged: list[int] = []
    finished = threading.Event()

    def reviewer():
        """Drops one example after another (each acknowledged when ``record`` returns) until the retrain ends."""
        for example_id in candidates:
            if finished.is_set():
                return
            store.record(run, [example_id], "drop", reviewer="racer")
            acknowledged.append(example_id)

    thread = threading.Thread(target=reviewer)
    thread.start()
    try:
        result = execute(instance, "retrain_job", run)
    finally:
        finished.set()
        thread.join()
    assert result.success and _curation_checks_pass(result)
    assert acknowledged, "no decision was recorded while the retrain ran"

    child = _child_of(run)
    trained = _trained_ids(child, tracking_uri)
    in_force = RunReview.open(run, outputs_base()).decisions(store).set_index("example_id")
    applied = [i for i in acknowledged if in_force.at[i, "applied_in"] == child]
    pending = [i for i in acknowledged if pd.isna(in_force.at[i, "applied_in"])]
    assert sorted(applied + pending) == sorted(acknowledged)
    assert not set(applied) & trained  # shown applied: really out of the child's training
    assert set(pending) <= trained  # shown pending: really still in it ...
    assert execute(instance, "influence_job", child).success
    for_child = RunReview.open(child, outputs_base()).decisions(store).set_index("example_id")
    assert set(pending) <= set(for_child.index)  # ... and in force for the child's next round
    assert (for_child.loc[pending, "action"] == "drop").all()
