"""MlflowClient for a resolved tracking URI, bounded in time, and experiments whose artifacts land where they should.

Every MLflow call of this project goes through ``tracking_client``, which (1) probes an HTTP tracking
server's ``/health`` with a short timeout first, so a dead server is a named ``MlflowUnavailable``
within seconds, and (2) bounds MLflow's own HTTP retries (MLflow's defaults, 7 retries with a
back-off factor of 2 and a 120 s timeout, wait for minutes before failing). The bounds are defaults:
a value the user set in the environment wins.
"""

from __future__ import annotations

import os

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..errors import ConfigurationError, MlflowUnavailable
from .config import artifact_location_for, prepare_store, resolve_tracking_uri

PROBE_TIMEOUT_ENV = "Z0INF_MLFLOW_PROBE_TIMEOUT"
DEFAULT_PROBE_TIMEOUT_S = 5.0
# MLflow reads these at every request. Worst case per call: 4 attempts x 20 s + back-off 1+2+4 s.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def bound_http_requests() -> None:
    """Give MLflow's HTTP client this project's retry and timeout bounds, unless the user chose others."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


def probe_timeout() -> float:
    text = os.environ.get(PROBE_TIMEOUT_ENV)
    if not text:
        return DEFAULT_PROBE_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigurationError(f"${PROBE_TIMEOUT_ENV}: {text!r} is not a positive number of seconds")
    return seconds


def check_reachable(tracking_uri: str, timeout_s: float | None = None) -> None:
    """Raise MlflowUnavailable quickly when an HTTP tracking server does not answer ``/health`` (local
    stores are always reachable)."""
    import requests

    if not tracking_uri.startswith(("http://", "https://")):
        return
    timeout_s = probe_timeout() if timeout_s is None else timeout_s
    try:
        response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as exc:
        raise MlflowUnavailable(
            f"MLflow at {tracking_uri} is unreachable ({type(exc).__name__}, probe timeout {timeout_s:g} s)"
        ) from None
    if response.status_code >= 500:
        raise MlflowUnavailable(f"MLflow at {tracking_uri} answered {response.status_code}")


def tracking_client(tracking_uri: str | None = None) -> MlflowClient:
    """A client for the resolved store, after a reachability probe, with bounded HTTP retries."""
    uri = resolve_tracking_uri(tracking_uri)
    bound_http_requests()
    check_reachable(uri)
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
