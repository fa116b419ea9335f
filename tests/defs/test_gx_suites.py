"""A data team tunes the flagging in the GX project and the next materialisation follows: the review
queue is the unexpected rows of the suite's flagging expectation, whatever cut-off the suite holds."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import numpy as np

from z0inf_pipeline.defs.assets import INFLUENCE_ASSETS
from z0inf_pipeline.defs.resources import ComputeResource, DecisionStoreResource, MlflowResource
from z0inf_pipeline.quality.suites import GX_DIR_ENV
from z0inf_pipeline.tracking import train_and_log

from .conftest import REPO_ROOT, TINY


def _queue(instance, run_id):
    result = dg.materialize_to_memory(
        INFLUENCE_ASSETS, partition_key=run_id, instance=instance,
        resources={"mlflow": MlflowResource(), "compute": ComputeResource(device="cpu"),
                   "decisions": DecisionStoreResource()},
    )
    assert result.success
    return result.output_for_node("review_queue"), result.output_for_node("self_influence")


def test_an_edited_cutoff_in_the_flagging_suite_changes_the_next_queue(tracking_uri, tmp_path, monkeypatch):
    project = tmp_path / "gx"
    shutil.copytree(REPO_ROOT / "gx", project, ignore=shutil.ignore_patterns("uncommitted"))
    monkeypatch.setenv(GX_DIR_ENV, str(project))
    run_id = train_and_log(TINY.replace(dataset="breast_cancer"), tracking_uri=tracking_uri)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("mlflow_runs", [run_id])
        first, scores = _queue(instance, run_id)
        mean_loss = scores.set_index("example_id")["mean_loss"]
        policy_cutoff = first.info["flagging"]["cutoff"]
        assert first.info["cutoff"] == policy_cutoff == first.info["flagging"]["policy_cutoff"]
        assert set(first.queue["example_id"]) == set(mean_loss.index[mean_loss >= policy_cutoff])

        # a person fixes the cut-off in gx/expectations/flagging.json
        edited = float(mean_loss.quantile(0.5))
        path = project / "expectations" / "flagging.json"
        suite = json.loads(path.read_text())
        [flagging] = [e for e in suite["expectations"] if e["kwargs"].get("column") == "flag_score"
                      and e["type"] == "expect_column_values_to_be_between"]
        flagging["kwargs"]["max_value"] = edited
        path.write_text(json.dumps(suite, indent=2))

        second, _ = _queue(instance, run_id)
    assert second.info["cutoff"] == second.info["flagging"]["cutoff"] == edited
    assert second.info["flagging"]["policy_cutoff"] == policy_cutoff  # the policy's own, recorded beside it
    assert set(second.queue["example_id"]) == set(mean_loss.index[mean_loss >= edited])
    assert len(second.queue) > len(first.queue)
