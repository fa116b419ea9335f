"""MlflowClient for a resolved tracking URI, and experiments whose artifacts land where they should."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .config import artifact_location_for, prepare_store, resolve_tracking_uri


def tracking_client(tracking_uri: str | None = None) -> MlflowClient:
    uri = resolve_tracking_uri(tracking_uri)
    prepare_store(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (with this store's artifact location) if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(client.tracking_uri))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another process created it first
        if experiment is None:
            raise
        return experiment.experiment_id
