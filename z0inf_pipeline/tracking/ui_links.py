"""What the MLflow UI can show people: a link straight to an experiment's model-training runs (MLflow 3
opens on its GenAI view, where these runs do not appear). The review's CSV/HTML previews and sheet,
which the artifact viewer shows, are made by ``review.artifacts``."""

from __future__ import annotations

# MLflow 3.x UI: the runs list of an experiment in its "Model training" view (the query parameter selects
# the view; verified against the 3.17 UI, whose router reads `workflowType` = "genai" | "machine_learning").
TRAINING_VIEW = "workflowType=machine_learning"
TRAINING_RUNS_FRAGMENT = "#/experiments/{experiment_id}/runs?" + TRAINING_VIEW
LOCAL_UI_URL = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves the local store


def training_runs_url(ui_url: str, experiment_id: str) -> str:
    """``http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning`` for ui_url and id 1."""
    return ui_url.rstrip("/") + "/" + TRAINING_RUNS_FRAGMENT.format(experiment_id=experiment_id)


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """One run's page in the "Model training" view (without the query MLflow 3 opens it under GenAI)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def experiment_runs_url(ui_url: str, experiment: str = "z0inf", tracking_uri: str | None = None) -> str:
    """The training runs view of ``experiment`` in the store (the experiment list when it does not exist yet)."""
    from .client import tracking_client

    found = tracking_client(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return ui_url.rstrip("/") + "/#/experiments?workflowType=machine_learning"
    return training_runs_url(ui_url, found.experiment_id)


def print_ui_links(ui_url: str = LOCAL_UI_URL) -> None:
    """Print the link to the model-training runs (``make mlflow-ui`` shows it before starting the UI)."""
    print(f"MLflow training runs: {experiment_runs_url(ui_url)}")
