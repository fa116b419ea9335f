"""Resources: the MLflow tracking store (around MlflowClient) and the torch compute device."""

from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from ..errors import MlflowUnavailable


class MlflowResource(dg.ConfigurableResource):
    """The MLflow tracking store the pipeline reads contract runs from and logs its outputs back to.

    ``tracking_uri`` unset: ``$MLFLOW_TRACKING_URI``, else ``$Z0INF_MLFLOW_CONFIG``, else the embedded
    SQLite store under the data directory (see ``z0inf_pipeline.tracking.config``).
    """

    tracking_uri: Optional[str] = Field(
        default=None, description="MLflow tracking URI (unset: environment / default store)"
    )
    experiment: str = Field(default="z0inf", description="experiment that retrained runs are logged to")
    probe_timeout_s: float = Field(default=5.0, description="seconds to wait for an HTTP tracking server's /health")

    def uri(self) -> str:
        from ..tracking import resolve_tracking_uri

        return resolve_tracking_uri(self.tracking_uri)

    def client(self):
        from ..tracking import tracking_client

        return tracking_client(self.uri())

    def check_reachable(self) -> None:
        """Raise MlflowUnavailable quickly when an HTTP tracking server is down (MLflow's own client
        would retry with back-off for minutes first). Local stores are always reachable."""
        from ..tracking.client import check_reachable

        check_reachable(self.uri(), self.probe_timeout_s)

    def contract_runs(self):
        """FINISHED contract runs, oldest first; MlflowUnavailable when the store cannot be asked."""
        import requests
        from mlflow.exceptions import MlflowException

        from ..tracking import list_contract_runs

        self.check_reachable()
        try:
            return list_contract_runs(tracking_uri=self.uri(), status="FINISHED")
        except (MlflowException, requests.RequestException, OSError) as exc:
            raise MlflowUnavailable(f"MLflow at {self.uri()} could not list runs ({exc})") from None

    def fetch(self, run_id: str):
        """The run's contract files, downloaded and validated (cached under the data directory)."""
        from ..tracking import fetch_run

        return fetch_run(run_id, tracking_uri=self.uri())

    def log_outputs(self, run_id: str, stage: str, files: list[Path], metrics: dict[str, float] | None = None) -> str:
        """Attach a stage's output files (as artifacts under ``z0inf/<stage>/``) and summary metrics to a run."""
        client = self.client()
        artifact_path = f"z0inf/{stage}"
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path)
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, float(value))
        return artifact_path

    def run_link(self, run_id: str) -> dg.MetadataValue:
        """Where to see the run in the MLflow UI: a link for a server, the UI command for a local store."""
        uri = self.uri()
        experiment_id = self.client().get_run(run_id).info.experiment_id
        fragment = f"#/experiments/{experiment_id}/runs/{run_id}"
        if uri.startswith(("http://", "https://")):
            return dg.MetadataValue.url(f"{uri.rstrip('/')}/{fragment}")
        return dg.MetadataValue.text(f"mlflow ui --backend-store-uri {uri}  ->  {fragment}")


class ComputeResource(dg.ConfigurableResource):
    """Where loss tables and influence are computed: ``device`` auto picks CUDA when present, else CPU."""

    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:<index>")
    batch_size: int = Field(default=4096, gt=0, description="examples per forward pass when evaluating losses")
    dtype: Literal["float32", "float64"] = Field(default="float32", description="precision of loss evaluation")

    def torch_device(self):
        from ..influence.devices import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"{self.torch_device()} / {self.dtype} / batch {self.batch_size}"
