"""Resources: what the assets of a run share. The MLflow tracking store (the analysed run is fetched
once and kept), the review decision store, and the torch compute device."""

from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from ..errors import MlflowUnavailable

# The op tags that mark the influence steps for GPU nodes: the Kubernetes code location
# (``z0inf_pipeline.deployments.k8s``) gives these steps a GPU and a toleration, and limits how many run
# at once; the Celery one (``z0inf_pipeline.deployments.celery``) puts them on the ``gpu`` queue, which
# only GPU workers listen on.
GPU_RESOURCE_TAG = "z0inf/resources"
CELERY_QUEUE_TAG = "dagster-celery/queue"
GPU_QUEUE = "gpu"
GPU_STEP_TAGS = {GPU_RESOURCE_TAG: "gpu", CELERY_QUEUE_TAG: GPU_QUEUE}


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
    _runs: dict = PrivateAttr(default_factory=dict)
    _infos: dict = PrivateAttr(default_factory=dict)

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
        """The run's contract files, downloaded and validated (cached under the data directory), fetched
        once per resource instance: the assets and checks of one step share it."""
        from ..tracking import fetch_run

        if run_id not in self._runs:
            self._runs[run_id] = fetch_run(run_id, tracking_uri=self.uri())
        return self._runs[run_id]

    def _info(self, run_id: str):
        if run_id not in self._infos:
            self._infos[run_id] = self.client().get_run(run_id).info
        return self._infos[run_id]

    def log_artifacts(self, run_id: str, artifact_path: str, files: list[Path]) -> None:
        """Attach files to a run under ``artifact_path`` (e.g. ``z0inf/self_influence``)."""
        client = self.client()
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path)

    def log_gx(self, run_id: str, folder: Path, files: list[Path]) -> None:
        """Attach files of a run's GX folder under ``gx/`` at their paths inside it (so that the Data Docs
        pages' links hold), with the Data Docs' stylesheets the first time (not GX's 3 MB of logos)."""
        client = self.client()
        styles = "uncommitted/data_docs/local_site/static/styles"
        if (folder / styles).is_dir() and not client.list_artifacts(run_id, f"gx/{styles}"):
            client.log_artifacts(run_id, str(folder / styles), f"gx/{styles}")
        for path in files:
            client.log_artifact(run_id, str(path), str(Path("gx") / path.parent.relative_to(folder)))

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Log summary metrics to a run in one request."""
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), stamp, 0) for key, value in metrics.items()]
        self.client().log_batch(run_id, metrics=batch)

    def run_link(self, run_id: str) -> dg.MetadataValue:
        """The run's page in the MLflow UI's "Model training" view: on the tracking server, or for a local
        store on the UI that ``make mlflow-ui`` starts (``run_metadata`` says so beside it)."""
        from ..tracking.ui_links import LOCAL_UI_URL, run_url

        uri = self.uri()
        ui = uri if uri.startswith(("http://", "https://")) else LOCAL_UI_URL
        return dg.MetadataValue.url(run_url(ui, self._info(run_id).experiment_id, run_id))

    def run_metadata(self, run_id: str, prefix: str = "mlflow_run") -> dict[str, dg.MetadataValue]:
        """The run's name, id and link, for the metadata of every materialisation and check of a run."""
        metadata = {
            prefix: self.run_link(run_id),
            f"{prefix}_name": dg.MetadataValue.text(self._info(run_id).run_name),
            f"{prefix}_id": dg.MetadataValue.text(run_id),
        }
        if not self.uri().startswith(("http://", "https://")):
            metadata[f"{prefix}_ui"] = dg.MetadataValue.text("a local store: start its UI with `make mlflow-ui`")
        return metadata


class DecisionStoreResource(dg.ConfigurableResource):
    """The review decision store: ``url`` unset is the SQLite file ``<data dir>/review.db``."""

    url: Optional[str] = Field(default=None, description="decision store location (unset: <data dir>/review.db)")

    def open(self):
        from ..review import DecisionStore

        return DecisionStore.open(self.url or None)


class ComputeResource(dg.ConfigurableResource):
    """Where loss tables and influence are computed: ``device`` auto picks CUDA when present, else CPU."""

    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:<index>")
    batch_size: int = Field(default=4096, gt=0, description="examples per forward pass when evaluating losses and random-direction projections")
    dtype: Literal["float32", "float64"] = Field(default="float32", description="precision of loss evaluation")

    def torch_device(self):
        from ..influence.devices import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"{self.torch_device()} / {self.dtype} / batch {self.batch_size}"
