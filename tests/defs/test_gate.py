"""The review gate: with noisy labels and no decisions retraining does not run; once the flagged
examples are decided it does, and the retrained run trains on exactly the curated set."""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from z0inf_pipeline.cli import main
from z0inf_pipeline.review import DecisionStore, RunLayout, read_review_queue
from z0inf_pipeline.review.layout import outputs_base
from z0inf_pipeline.tracking import fetch_run, list_contract_runs
from z0inf_pipeline.training import load_dataset

from .conftest import TINY, execute


def materialised(result) -> set[str]:
    return {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
    }


def test_gate_blocks_retraining_until_flagged_examples_are_decided(instance, contract_run, tracking_uri, capsys):
    assert execute(instance, "influence_job", contract_run).success
    layout = RunLayout.for_run(contract_run, outputs_base())

    # a shut gate is the expected state during a review, not a failure: the run succeeds, retraining skipped
    blocked = execute(instance, "retrain_job", contract_run)
    assert blocked.success
    gate = {e.check_name: e for e in blocked.get_asset_check_evaluations()}["review_gate"]
    assert not gate.passed and gate.description.startswith("review gate BLOCKED")
    skipped = {e.step_key for e in blocked.all_events if e.event_type_value == "STEP_SKIPPED"}
    assert "retrained_run" in skipped
    assert not [e for e in blocked.all_events if e.event_type_value == "STEP_FAILURE"]
    queue, info = read_review_queue(layout.review_queue)
    assert gate.metadata["unreviewed"].value == len(queue) > 0
    assert materialised(blocked) == {"review_queue"}  # neither curated_training_set nor retrained_run
    assert not layout.curated_set.exists() and not layout.retrained.exists()
    assert len(list_contract_runs(tracking_uri=tracking_uri)) == 1  # no retrained run in MLflow

    # Decide through the CLI: drop the first half of the flagged examples, relabel the others to
    # their true class (taken from the dataset loader, independent of the pipeline).
    bundle = load_dataset(TINY.dataset, seed=TINY.seed, test_fraction=TINY.test_fraction, label_noise=TINY.noise)
    clean = dict(zip(bundle.train.example_ids.tolist(), bundle.clean_train_labels.tolist()))
    flagged = queue["example_id"].tolist()
    drop, relabel = flagged[: len(flagged) // 2], flagged[len(flagged) // 2 :]
    assert main(["review", "decide", contract_run, *map(str, drop), "--action", "drop", "--reviewer", "test"]) == 0
    for example_id in relabel[:-1]:
        assert (
            main(
                [
                    "review",
                    "decide",
                    contract_run,
                    str(example_id),
                    "--action",
                    "relabel",
                    "--label",
                    str(clean[example_id]),
                ]
            )
            == 0
        )
    out = capsys.readouterr().out
    assert "review gate BLOCKED: 1 of" in out.splitlines()[-1]  # one flagged example still undecided

    still_blocked = execute(instance, "retrain_job", contract_run)
    assert still_blocked.success and materialised(still_blocked) == {"review_queue"}
    assert (
        main(
            [
                "review",
                "decide",
                contract_run,
                str(relabel[-1]),
                "--action",
                "relabel",
                "--label",
                str(clean[relabel[-1]]),
            ]
        )
        == 0
    )

    # Re-materialising the influence assets leaves the decisions alone.
    before = DecisionStore.open().current(contract_run)
    assert execute(instance, "influence_job", contract_run).success
    pd.testing.assert_frame_equal(DecisionStore.open().current(contract_run), before)

    passed = execute(instance, "retrain_job", contract_run)
    assert passed.success
    assert materialised(passed) == {"review_queue", "curated_training_set", "retrained_run", "model_promotion"}
    # every check passed; whether the retrained model became champion is a warning, not a failure
    assert all(e.passed for e in passed.get_asset_check_evaluations() if e.check_name != "retrained_model_is_champion")

    child_id = pd.read_parquet(layout.retrained).at[0, "retrained_run_id"]
    child = fetch_run(child_id, tracking_uri=tracking_uri)
    assert child.tags["z0inf.parent_run_id"] == contract_run
    examples = pd.read_parquet(child.examples)
    trained = examples[examples["split"] == "train"].set_index("example_id")
    parent_train = set(bundle.train.example_ids.tolist())
    assert set(trained.index) == parent_train - set(drop)
    assert trained.loc[relabel, "label"].tolist() == [clean[i] for i in relabel]
    untouched = sorted(parent_train - set(flagged))
    noisy = dict(zip(bundle.train.example_ids.tolist(), bundle.train.labels.tolist()))
    assert trained.loc[untouched, "label"].tolist() == [noisy[i] for i in untouched]
    assert sorted(child.train_config["exclude_ids"]) == sorted(drop)
    assert sorted(map(tuple, child.train_config["relabels"])) == sorted((i, clean[i]) for i in relabel)
    assert MlflowClient(tracking_uri).get_run(contract_run).data.tags["z0inf.retrained_run_id"] == child_id
    assert np.isfinite(pd.read_parquet(layout.retrained).at[0, "retrained_test_accuracy"])

    # The retrained run is a contract run like any other: the next curation round can start on it.
    next_round = execute(instance, "influence_job", child_id)
    assert next_round.success
    assert len(pd.read_parquet(RunLayout.for_run(child_id, outputs_base()).self_influence)) == len(parent_train) - len(drop)


def test_decide_refuses_ids_that_are_not_training_examples(instance, contract_run, capsys):
    assert execute(instance, "influence_job", contract_run).success
    examples = pd.read_parquet(RunLayout.for_run(contract_run, outputs_base()).examples)
    test_id = int(examples.loc[examples["split"] == "test", "example_id"].iloc[0])
    assert main(["review", "decide", contract_run, str(test_id), "--action", "drop"]) == 2
    assert "not training examples" in capsys.readouterr().err
    assert main(["review", "decide", contract_run, "--flagged", "--action", "relabel", "--label", "10"]) == 2
    assert "label 10 is outside the run's label set" in capsys.readouterr().err
    assert DecisionStore.open().current(contract_run).empty
