"""A rejected recipe leaves no MLflow run; unsafe artifact names are judged by path parts."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from z0inf_pipeline.cli import main
from z0inf_pipeline.tracking import ContractError, fetch_run, train_and_log
from z0inf_pipeline.tracking.contract import check_artifact_path
from z0inf_pipeline.training import TrainConfig

TINY = TrainConfig(epochs=2, checkpoints=3, hidden=(8,))


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


def test_rejected_recipes_leave_no_mlflow_run(tracking_uri, tmp_path, capsys):
    one_class = tmp_path / "one_class.csv"
    pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "label": [0, 0, 0, 0]}).to_csv(one_class, index=False)
    rejected = [
        (["--dataset", tmp_path / "missing.csv"], "no such file"),
        (["--dataset", one_class], "fewer than two classes"),
        (["--dataset", "breast_cancer", "--model", "cnn"], "only available for digits"),
        (["--epochs", "1", "--checkpoints", "500"], "500 requested but training has only"),
        (["--test-fraction", "1.5"], "test_fraction=1.5"),
        (["--label-noise", "1.0"], "label_noise=1.0"),
        (["--epochs", "0"], "epochs=0"),
    ]
    for argv, message in rejected:
        code = main(["train", *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("z0inf: error: ") and message in err, (argv, err)
    assert all_runs(tracking_uri) == []
    # and an accepted recipe still makes exactly one FINISHED run
    assert main(["train", "--epochs", "2", "--checkpoints", "3", "--hidden", "8"]) == 0
    assert [r.info.status for r in all_runs(tracking_uri)] == ["FINISHED"]


@pytest.mark.parametrize("name", ["notes..txt", "a..b/c", "dir/..hidden", "x/y...z", "checkpoints/v2..safetensors"])
def test_names_with_dots_inside_a_part_are_safe(name):
    assert str(check_artifact_path("run", name)) == name


@pytest.mark.parametrize("name", ["../x", "a/../b", "..", "/etc/passwd", "a\\b", "C:/x", "a/../../b"])
def test_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(ContractError, match="unsafe name"):
        check_artifact_path("run", name)


def test_a_run_with_an_artifact_named_notes_dot_dot_txt_is_fetched(tracking_uri, tmp_path):
    run_id = train_and_log(TINY, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    client.log_text(run_id, "reviewed by A.", "notes..txt")
    client.log_text(run_id, "not in the manifest", "checkpoints/..step_00000099.safetensors")
    run = fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    assert run.run_id == run_id and len(run.checkpoints) == 3
