"""Two review rounds: decisions carry from a run to the runs retrained from it (real MLflow lineage,
real decision store), and the mixture cut-off of a reviewed run is kept for its retrained, cleaner runs
(real trainings with the project's trainer)."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from z0inf_pipeline.influence.analysis import InfluenceAnalysis
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.review import (
    DecisionStore,
    FlagPolicy,
    RunLayout,
    build_review_queue,
    decisions_in_force,
    evaluate_gate,
    flag_scores,
    lineage_decisions,
    write_review_queue,
)
from z0inf_pipeline.review.lineage import CALIBRATED_ON_KEY, LINEAGE_INFO_KEY, inherited_cutoff
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import run_lineage
from z0inf_pipeline.tracking.contract import PARENT_TAG
from z0inf_pipeline.training import DEMO_CONFIG, TrainConfig, train


def _runs(client: MlflowClient, count: int) -> list[str]:
    """A chain of MLflow runs, each tagged with the previous one as its parent (oldest first)."""
    experiment = client.create_experiment("lineage")
    ids: list[str] = []
    for _ in range(count):
        tags = {PARENT_TAG: ids[-1]} if ids else {}
        ids.append(client.create_run(experiment, tags=tags).info.run_id)
    return ids


def test_lineage_follows_parent_tags_and_refuses_cycles(tracking_uri):
    client = MlflowClient(tracking_uri)
    a, b, c = _runs(client, 3)
    assert run_lineage(c, client) == [c, b, a]
    assert run_lineage(a, client) == [a]
    with pytest.raises(InputError, match="longer than 1"):
        run_lineage(c, client, max_depth=1)
    client.set_tag(a, PARENT_TAG, c)
    with pytest.raises(InputError, match="cycle"):
        run_lineage(c, client)
    client.set_tag(a, PARENT_TAG, "f" * 32)  # a parent that is gone ends the chain
    assert run_lineage(c, client) == [c, b, a, "f" * 32]
    with pytest.raises(InputError, match="does not exist"):
        run_lineage("0" * 32, client)


def test_decisions_carry_across_two_rounds_until_changed(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    first, second = _runs(client, 2)
    store = DecisionStore.open(tmp_path / "review.db")
    store.record(first, [1, 5], "drop")
    store.record(first, [2], "keep")
    store.record(first, [3], "relabel", label=0)
    store.record(second, [1], "keep", note="round 2 changes round 1")  # dropped ids cannot recur, but may

    lineage = run_lineage(second, client)
    in_force = decisions_in_force(store.current_for_runs(lineage), lineage).set_index("example_id")
    assert in_force["action"].to_dict() == {1: "keep", 2: "keep", 3: "relabel", 5: "drop"}
    assert in_force["decided_on_run"].to_dict() == {1: second, 2: first, 3: first, 5: first}
    assert in_force.loc[3, "label"] == 0

    # round 2 flags 1, 2, 3 (decided somewhere in the lineage) and 4 (new): the gate waits for 4 only
    status = evaluate_gate([1, 2, 3, 4], in_force.index, training_examples=100, max_unreviewed_fraction=0.0)
    assert status.unreviewed_ids == (4,) and not status.passed
    # the first run's own view is untouched by the second round
    assert store.current(first).set_index("example_id").loc[1, "action"] == "drop"

    # a later decision, even on the earlier run, replaces what was in force
    store.record(first, [2], "drop", note="second thoughts")
    info = {LINEAGE_INFO_KEY: lineage}
    again = lineage_decisions(store, second, info).set_index("example_id")
    assert again.loc[2, "action"] == "drop" and again.loc[2, "decided_on_run"] == first
    store.record(second, [4], "keep")
    status = evaluate_gate([1, 2, 3, 4], lineage_decisions(store, second, info)["example_id"], 100, 0.0)
    assert status.passed and status.unreviewed == 0

    # the queue shows each decision and the run it was made on
    scores = pd.DataFrame({"example_id": [1, 2, 3, 4], "mean_loss": [4.0, 3.0, 2.0, 1.0]})
    examples = pd.DataFrame({"example_id": [1, 2, 3, 4], "label": 1, "original_label": 1, "flipped": False})
    losses = pd.DataFrame({"example_id": [1, 2, 3, 4], "step_0": 1.0, "step_5": 0.5})
    queue = build_review_queue(scores, flag_scores(scores, FlagPolicy(method="quantile", quantile=0.01)),
                               examples, losses, None, lineage_decisions(store, second, info))
    assert queue["example_id"].tolist() == [1, 2, 3]  # above the 1% quantile, highest first
    assert queue["decided_on_run"].tolist() == [second, first, first]
    assert queue["decision"].tolist() == ["keep", "drop", "relabel"]
    with pytest.raises(InputError, match="lineage starts at"):
        lineage_decisions(store, first, info)


def _frame(run):
    return InfluenceAnalysis(run.checkpoints, run.train_losses).self_influence_frame()


@pytest.mark.parametrize(
    "config",
    [DEMO_CONFIG, TrainConfig(dataset="breast_cancer", label_noise=0.1)],
    ids=["digits 10% uniform", "breast_cancer 10% uniform"],
)
def test_a_run_retrained_without_the_flips_flags_at_most_a_third_as_many(config, tracking_uri, tmp_path):
    parent = train(config, tmp_path / "parent")
    child = train(config.replace(exclude_ids=tuple(parent.bundle.flipped_ids)), tmp_path / "child")
    policy = FlagPolicy()
    parent_flags = flag_scores(_frame(parent), policy)
    flipped = np.isin(parent.bundle.train.example_ids, parent.bundle.flipped_ids)
    assert flipped[parent_flags.flagged].mean() > 0.5  # mostly the injected flips
    assert flipped[parent_flags.flagged].sum() >= 0.9 * flipped.sum()

    # the parent's queue on disk, as the review_queue asset writes it; the child inherits its cut-off
    client = MlflowClient(tracking_uri)
    parent_id, child_id = _runs(client, 2)
    write_review_queue(pd.DataFrame({"example_id": [0]}), RunLayout.for_run(parent_id, outputs_base()).review_queue,
                       {"policy": policy.to_dict(), "cutoff": parent_flags.cutoff, CALIBRATED_ON_KEY: parent_id})
    inherited = inherited_cutoff(run_lineage(child_id, client), policy, outputs_base())
    assert inherited == (parent_flags.cutoff, parent_id)
    assert inherited_cutoff(run_lineage(child_id, client), policy.replace(posterior=0.9), outputs_base()) is None  # other policy
    child_flags = flag_scores(_frame(child), policy, inherited_cutoff=inherited[0])
    assert child_flags.count <= parent_flags.count / 3, (child_flags.count, parent_flags.count)
