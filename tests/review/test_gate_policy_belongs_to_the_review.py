"""The review gate's policy is fixed when the run's queue is built: `materialize retrain` flags cannot
loosen it, and changing it is rebuilding the queue under a reviewer's name, recorded with the queue,
shown by `review list` and in the Dagster metadata. Real MLflow, real Dagster instance, the real CLI."""

from __future__ import annotations

import dagster as dg
import pytest

from z0inf_pipeline.cli import main
from z0inf_pipeline.errors import ReviewError
from z0inf_pipeline.review import RunLayout, read_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.review.gate import policy_changes
from z0inf_pipeline.tracking import list_contract_runs

from ..defs.conftest import contract_run, dagster_home, execute, instance  # noqa: F401 - fixtures


@pytest.mark.parametrize(
    "loosening", [["--max-unreviewed-fraction", "1.0"], ["--max-flagged", "1"]]
)
def test_retrain_flags_cannot_open_a_closed_gate(loosening, dagster_home, contract_run, tracking_uri, capsys):
    assert main(["materialize", "influence", "--run", contract_run]) == 0
    layout = RunLayout.for_run(contract_run, outputs_base())
    before = read_review_queue(layout.review_queue)[1]["policy"]

    assert main(["materialize", "retrain", "--run", contract_run, *loosening]) == 2
    err = capsys.readouterr().err
    assert "a retrain cannot change the flag policy" in err and "Traceback" not in err
    assert read_review_queue(layout.review_queue)[1]["policy"] == before
    assert not layout.retrained.exists() and len(list_contract_runs(tracking_uri=tracking_uri)) == 1
    # Without flags the retrain uses the queue's own policy: the gate is still closed.
    assert main(["materialize", "retrain", "--run", contract_run]) == 3
    assert "review gate BLOCKED" in capsys.readouterr().out


def test_changing_the_policy_is_a_recorded_rebuild_by_a_named_reviewer(dagster_home, contract_run, capsys):
    assert main(["materialize", "influence", "--run", contract_run]) == 0
    layout = RunLayout.for_run(contract_run, outputs_base())
    assert main(["materialize", "influence", "--run", contract_run, "--max-unreviewed-fraction", "1.0"]) == 2
    assert "name yourself" in capsys.readouterr().err
    assert read_review_queue(layout.review_queue)[1]["policy"]["max_unreviewed_fraction"] == 0.0

    assert main(["materialize", "influence", "--run", contract_run, "--max-unreviewed-fraction", "1.0",
                 "--policy-changed-by", "ana"]) == 0
    info = read_review_queue(layout.review_queue)[1]
    assert info["policy"]["max_unreviewed_fraction"] == 1.0
    [change] = info["policy_changes"]
    assert change["by"] == "ana" and change["from"]["max_unreviewed_fraction"] == 0.0
    assert change["to"]["max_unreviewed_fraction"] == 1.0
    capsys.readouterr()
    assert main(["review", "list", "--run", contract_run]) == 0
    assert "flag policy changed by ana" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        [record] = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("review_queue"), asset_partitions=[contract_run]), limit=1
        ).records
    assert record.asset_materialization.metadata["policy_changes"].value[0]["by"] == "ana"
    # The next retrain keeps the rebuilt policy, and the record stays with the queue.
    assert main(["materialize", "retrain", "--run", contract_run]) == 0
    assert read_review_queue(layout.review_queue)[1]["policy_changes"][0]["by"] == "ana"


def test_policy_changes_is_refused_inside_a_retrain_even_with_a_reviewer():
    built = {"policy": {"max_unreviewed_fraction": 0.0}}
    with pytest.raises(ReviewError, match="a retrain cannot change"):
        policy_changes("r1", built, {"max_unreviewed_fraction": 0.5}, changed_by="ana", retraining=True)
    with pytest.raises(ReviewError, match="name yourself"):
        policy_changes("r1", built, {"max_unreviewed_fraction": 0.5}, changed_by="  ", retraining=False)
    assert policy_changes("r1", built, {"max_unreviewed_fraction": 0.0}, changed_by=None, retraining=True) == []
    assert policy_changes("r1", None, {"max_unreviewed_fraction": 1.0}, changed_by=None, retraining=True) == []
