"""Retrain is safe beside influence and beside itself: a scores check that was planned but never
evaluated (its influence run died or is still going) is "not evaluated", not an internal error; two
retrains of one run at once make one child, and the second names the first. Real Dagster instance,
real MLflow, the real CLI in real processes."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import pandas as pd

from z0inf_pipeline.cli import main
from z0inf_pipeline.defs.provenance import SCORES_CHECK, checked_hash
from z0inf_pipeline.review import RunLayout
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import list_contract_runs

from .conftest import execute


def _interrupted_influence(instance, run_id: str):
    """An influence run that plans the scores check and ends before evaluating it (as a kill -9 or a run
    still in flight leaves it): its self_influence step cannot load the Gram matrix."""
    from z0inf_pipeline.definitions import defs

    gram = RunLayout.for_run(run_id, outputs_base()).gram
    saved = gram.read_bytes()
    gram.unlink()
    try:
        result = defs.resolve_job_def("influence_job").execute_in_process(
            instance=instance, partition_key=run_id, raise_on_error=False,
            asset_selection=[dg.AssetKey("self_influence")],
        )
    finally:
        gram.write_bytes(saved)
    assert not result.success
    assert SCORES_CHECK not in {e.asset_check_key for e in result.get_asset_check_evaluations()}
    return result


def test_a_planned_but_unevaluated_scores_check_does_not_break_retraining(instance, contract_run):
    assert execute(instance, "influence_job", contract_run).success
    assert main(["review", "decide", contract_run, "--flagged", "--action", "keep", "--reviewer", "t"]) == 0
    _interrupted_influence(instance, contract_run)
    # the stored scores are still the ones the check passed in the run that wrote them
    expected, found = checked_hash(instance, contract_run)
    assert expected is not None, found
    result = execute(instance, "retrain_job", contract_run)
    assert result.success, [e.message for e in result.all_events if e.is_failure]


def test_scores_written_by_a_run_whose_check_never_ran_are_not_evaluated(instance, contract_run):
    """The other side: when the interrupted run did write new scores, they are unchecked, and the
    retrain says so by name instead of failing inside Dagster."""
    assert execute(instance, "influence_job", contract_run).success
    from z0inf_pipeline.definitions import defs

    # a run that materialises self_influence but whose check evaluation is left out of the run
    job = defs.resolve_job_def("influence_job").get_subset(
        asset_selection={dg.AssetKey("self_influence")}, asset_check_selection=set()
    )
    partial = job.execute_in_process(instance=instance, partition_key=contract_run, raise_on_error=False)
    assert partial.success
    expected, found = checked_hash(instance, contract_run)
    assert expected is None and "not evaluated" in found and partial.run_id in found


def test_two_retrains_of_one_run_at_once_make_one_child(instance, contract_run, tracking_uri):
    assert execute(instance, "influence_job", contract_run).success
    assert main(["review", "decide", contract_run, "--flagged", "--action", "drop", "--reviewer", "t"]) == 0
    command = [sys.executable, "-m", "z0inf_pipeline.cli", "materialize", "retrain", "--run", contract_run]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    codes = [p.returncode for p in processes]
    assert sorted(codes) == [0, 2], outputs
    runs = list_contract_runs(tracking_uri=tracking_uri)
    assert len(runs) == 2  # the parent and one child
    child = str(pd.read_parquet(RunLayout.for_run(contract_run, outputs_base()).retrained).at[0, "retrained_run_id"])
    [finished] = [r for r in instance.get_runs(dg.RunsFilter(job_name="retrain_job"))
                  if r.status == dg.DagsterRunStatus.SUCCESS]
    refused = outputs[codes.index(2)]
    assert finished.run_id in refused[1] and "one retrain per round" in refused[1]
    assert "Traceback" not in refused[1]
    assert child in {getattr(r, "run_id", r) for r in runs}
