"""What stops the flow: a failing blocking Great Expectations check, the review gate, scores edited
after they were checked; and how `z0inf materialize` reports each (exit status, cause, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import numpy as np
import pandas as pd

from z0inf_pipeline.cli import main
from z0inf_pipeline.defs.assets import INFLUENCE_ASSETS
from z0inf_pipeline.defs.checks import ALL_CHECKS
from z0inf_pipeline.defs.partitions import PER_RUN
from z0inf_pipeline.defs.resources import ComputeResource, DecisionStoreResource, MlflowResource
from z0inf_pipeline.defs.storage import LossShardsIOManager, RunOutputsIOManager
from z0inf_pipeline.review import DecisionStore, RunLayout
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import list_contract_runs


def test_failing_blocking_gx_check_stops_the_downstream_assets(instance, contract_run):
    """The examples table lacks one training example that the loss tables hold: loss_tables_are_valid
    fails, so nothing downstream of loss_tables is materialised in that run."""

    @dg.asset(name="training_run", **PER_RUN)
    def examples_missing_a_training_row(context, mlflow: MlflowResource) -> pd.DataFrame:
        examples = pd.read_parquet(mlflow.fetch(context.partition_key).examples)
        return examples.drop(index=examples.index[examples["split"] == "train"][0])

    instance.add_dynamic_partitions("mlflow_runs", [contract_run])
    mlflow = MlflowResource()
    result = dg.materialize(
        [examples_missing_a_training_row, *INFLUENCE_ASSETS[1:], *ALL_CHECKS[:4]],
        partition_key=contract_run,
        instance=instance,
        resources={
            "mlflow": mlflow,
            "compute": ComputeResource(device="cpu"),
            "decisions": DecisionStoreResource(),
            "run_outputs": RunOutputsIOManager(mlflow=mlflow),
            "loss_shards": LossShardsIOManager(),
        },
        run_config={"ops": {"loss_tables": {"config": {"source": "logged"}}}},
        raise_on_error=False,
    )
    assert not result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {"loss_tables_are_valid"}
    check = evaluations["loss_tables_are_valid"]
    assert not check.passed and check.metadata["failed_expectations"].value >= 1
    assert check.metadata["mlflow_run_id"].value == contract_run
    materialised = {
        e.event_specific_data.materialization.asset_key.to_user_string() for e in result.get_asset_materialization_events()
    }
    assert materialised == {"training_run", "loss_tables"}
    layout = RunLayout.for_run(contract_run, outputs_base())
    assert not layout.gram.exists() and not layout.self_influence.exists()


def test_materialize_exit_codes_and_scores_edited_after_the_check_keep_the_gate_shut(
    dagster_home, contract_run, tracking_uri, capsys
):
    # A run id MLflow does not know: the failed step's own message, exit status 2, no traceback.
    assert main(["materialize", "influence", "--run", "0" * 32]) == 2
    err = capsys.readouterr().err
    assert "z0inf: error: training_run: " in err and "0" * 32 in err and "Traceback" not in err
    assert "Error occurred while executing" not in err

    assert main(["materialize", "influence", "--run", contract_run]) == 0
    capsys.readouterr()
    layout = RunLayout.for_run(contract_run, outputs_base())
    queue = pd.read_parquet(layout.review_queue)

    # No decisions: the gate blocks, and the output ends with what to do, not a traceback.
    assert main(["materialize", "retrain", "--run", contract_run]) == 3
    captured = capsys.readouterr()
    assert "retraining did not run: review gate BLOCKED" in captured.out and "Traceback" not in captured.err
    # Dagster's notice on the skipped check ("emitted no result") is not printed: the gate's message says it.
    # In a child process: under pytest the root logger has handlers, so Python's last resort is not used.
    child = subprocess.run([sys.executable, "-m", "z0inf_pipeline.cli", "materialize", "retrain", "--run", contract_run],
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 3 and "emitted no result" not in child.stderr, child.stderr
    assert "[FAIL] review_gate" in captured.out

    # The walk-round of issue 10: delete the flagged rows from the stored scores, so that a rebuilt queue
    # holds only examples that are then kept. The scores are not the ones the check passed: refused.
    scores = pd.read_parquet(layout.self_influence)
    edited = scores[~scores["example_id"].isin(queue["example_id"])]
    edited.to_parquet(layout.self_influence, index=False)
    si = edited["self_influence"].to_numpy()
    would_be_queue = edited.loc[si > np.quantile(si, 0.9), "example_id"]
    DecisionStore.open().record(contract_run, would_be_queue, "keep", reviewer="walk-round")

    assert main(["materialize", "retrain", "--run", contract_run]) == 2
    captured = capsys.readouterr()
    assert f"z0inf: error: review_queue: self-influence scores {layout.self_influence}" in captured.err
    assert "not what self_influence_is_valid passed" in captured.err and "Traceback" not in captured.err
    assert not layout.curated_set.exists() and not layout.retrained.exists()
    assert len(list_contract_runs(tracking_uri=tracking_uri)) == 1  # nothing was retrained
    pd.testing.assert_frame_equal(pd.read_parquet(layout.review_queue), queue)  # the checked queue stands
