"""Writing contract runs: ``train_and_log`` for this project's recipes, ``ContractLogger`` for any PyTorch loop."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

from ..influence.checkpoints import save_checkpoint
from ..influence.loss_tables import LossFn
from ..training import layout
from ..training.datasets import Split
from ..training.models import ModelSpec
from ..training.recording import SplitRecorder, cross_entropy_per_example
from ..training.trainer import TrainConfig, plan_training, train
from .client import ensure_experiment, tracking_client
from .contract import (
    CONTRACT_TAG,
    CONTRACT_VERSION,
    DATASET_TAG,
    NUM_CHECKPOINTS_TAG,
    PARENT_TAG,
    SOURCE_TAG,
    ContractError,
    validate_run_folder,
)

MLFLOW_PARENT_TAG = "mlflow.parentRunId"


class _RunWriter:
    """One MLflow run with the contract tags: metrics as they come, the artifact folder at the end."""

    def __init__(self, client: MlflowClient, experiment: str, *, run_name: str | None, tags: Mapping[str, Any],
                 parent_run_id: str | None) -> None:
        all_tags = {CONTRACT_TAG: CONTRACT_VERSION, **{k: str(v) for k, v in tags.items()}}
        if parent_run_id:
            all_tags.update({PARENT_TAG: parent_run_id, MLFLOW_PARENT_TAG: parent_run_id})
        self.client = client
        self.run_id = client.create_run(ensure_experiment(client, experiment), run_name=run_name,
                                        tags=all_tags).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])

    def log_row(self, row: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        step = int(row["step"])
        metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "step"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, folder: Path) -> None:
        """Validate the folder as a reader would, upload it, and mark the run finished."""
        files = validate_run_folder(folder, run_id=self.run_id)
        self.client.log_artifacts(self.run_id, str(folder))
        self.client.set_tag(self.run_id, NUM_CHECKPOINTS_TAG, str(len(files.checkpoints)))
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def abort(self, exc: BaseException) -> None:
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def train_params(config: TrainConfig) -> dict[str, Any]:
    """The recipe as MLflow params; id lists are summarised by their length (the full recipe is
    the ``train_config.json`` artifact)."""
    params = config.to_dict()
    params["exclude_ids"] = len(config.exclude_ids)
    params["relabels"] = len(config.relabels)
    params["train_subset"] = "all" if config.train_subset is None else len(config.train_subset)
    return params


def train_and_log(
    config: TrainConfig,
    *,
    tracking_uri: str | None = None,
    experiment: str = "z0inf",
    parent_run_id: str | None = None,
    tags: dict | None = None,
    progress: bool = False,
    run_name: str | None = None,
) -> str:
    """Train ``config`` into a new contract run (metrics logged live, artifacts at the end); return its id.

    The recipe and its data are checked first: a rejected recipe leaves no MLflow run behind.
    ``run_name`` defaults to dataset, model and label noise (``digits-mlp-noise0.1``)."""
    plan = plan_training(config)
    client = tracking_client(tracking_uri)
    dataset = Path(config.dataset).name
    noise = f"-noise{config.label_noise:g}" if config.label_noise else ""
    writer = _RunWriter(
        client, experiment, run_name=run_name or f"{Path(config.dataset).stem}-{config.model}{noise}",
        tags={SOURCE_TAG: "train_and_log", DATASET_TAG: dataset, **(tags or {})}, parent_run_id=parent_run_id,
    )
    try:
        writer.log_params(train_params(config))
        with tempfile.TemporaryDirectory(prefix="z0inf-train-") as tmp:
            result = train(config, Path(tmp) / "run", progress=progress, on_checkpoint=writer.log_row, plan=plan)
            writer.log_params({
                "n_train": len(result.bundle.train), "n_test": len(result.bundle.test),
                "num_classes": result.bundle.num_classes, "n_flipped": len(result.bundle.flipped_ids),
            })
            writer.finish(Path(tmp) / "run")
    except BaseException as exc:
        writer.abort(exc)
        raise
    return writer.run_id


_RETRAIN_SUFFIX = re.compile(r"^(?P<base>.*) · retrain (?P<round>\d+)$")


def retrained_run_name(parent_name: str | None) -> str:
    """The name of a run retrained from ``parent_name``, telling the round: ``digits-mlp · retrain 1``,
    and from that one ``digits-mlp · retrain 2`` (MLflow lists parent and child apart at a glance)."""
    match = _RETRAIN_SUFFIX.match(parent_name or "")
    if match:
        return f"{match['base']} · retrain {int(match['round']) + 1}"
    return f"{parent_name or 'run'} · retrain 1"


SplitLike = Split | tuple[Any, torch.Tensor, torch.Tensor]


class ContractLogger:
    """Turn a team's own PyTorch loop into a contract run::

        with ContractLogger(model_spec=spec, train=(ids, x, y), test=(test_ids, x_test, y_test),
                            loss_fn=my_per_example_loss) as run:
            for step in ...:
                ...
                if step in checkpoint_steps:
                    run.on_checkpoint(model, step, epoch=epoch, lr=lr)
        print(run.run_id)

    ``model_spec`` rebuilds the network: a ``ModelSpec``, or ``{"factory": "package.module:function",
    "kwargs": {...}}`` for a network of your own. ``loss_fn(outputs, targets)`` returns one loss per
    example (default: cross-entropy). If the block raises, the run is marked failed and nothing is uploaded.
    """

    def __init__(
        self,
        *,
        model_spec: ModelSpec | Mapping[str, Any],
        train: SplitLike,
        test: SplitLike,
        loss_fn: LossFn = cross_entropy_per_example,
        experiment: str = "z0inf",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        dataset: str = "custom",
        original_train_labels: torch.Tensor | np.ndarray | None = None,
        flipped_ids: np.ndarray | None = None,
        expected_checkpoints: int = 20,
    ) -> None:
        self.model_spec = model_spec.to_dict() if isinstance(model_spec, ModelSpec) else dict(model_spec)
        if "factory" not in self.model_spec:
            ModelSpec.from_dict(self.model_spec)
        elif not re.fullmatch(r"[\w.]+:[\w.]+", str(self.model_spec["factory"])):
            raise ContractError(f"ContractLogger: model_spec factory {self.model_spec['factory']!r} is not "
                                "'package.module:function'")
        self.train, self.test = (_as_split(train, "train"), _as_split(test, "test"))
        self.recorders = [
            SplitRecorder(split.example_ids, split.features, split.labels, loss_fn=loss_fn,
                          capacity=expected_checkpoints, name=name)
            for name, split in (("train", self.train), ("test", self.test))
        ]
        labels = self.train.labels if original_train_labels is None else original_train_labels
        self.original_train_labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
        if len(self.original_train_labels) != len(self.train):
            raise ContractError(f"ContractLogger: {len(self.original_train_labels)} original_train_labels for "
                                f"{len(self.train)} training examples")
        self.flipped_ids = np.asarray([] if flipped_ids is None else flipped_ids, dtype=np.int64)
        self._setup = dict(experiment=experiment, tracking_uri=tracking_uri, run_name=run_name,
                           params=dict(params or {}), tags=dict(tags or {}), parent_run_id=parent_run_id,
                           dataset=dataset)
        self._writer: _RunWriter | None = None
        self._work: Path | None = None

    @property
    def run_id(self) -> str:
        if self._writer is None:
            raise ContractError("ContractLogger: the run starts when the `with` block is entered")
        return self._writer.run_id

    def __enter__(self) -> "ContractLogger":
        s = self._setup
        self._writer = _RunWriter(
            tracking_client(s["tracking_uri"]), s["experiment"], run_name=s["run_name"],
            tags={SOURCE_TAG: "ContractLogger", DATASET_TAG: s["dataset"], **s["tags"]},
            parent_run_id=s["parent_run_id"],
        )
        self._work = Path(tempfile.mkdtemp(prefix="z0inf-logger-"))
        try:
            self._writer.log_params({**s["params"], "n_train": len(self.train), "n_test": len(self.test)})
        except BaseException as exc:
            self._close(exc)
            raise
        return self

    def on_checkpoint(self, model: torch.nn.Module, step: int, *, epoch: float | None = None,
                      lr: float | None = None, metrics: Mapping[str, float] | None = None) -> dict[str, float]:
        """Save ``model`` as the checkpoint of ``step``, record both loss tables, log the metrics; return them."""
        if self._writer is None or self._work is None:
            raise ContractError("ContractLogger.on_checkpoint: use the logger inside a `with` block")
        row: dict[str, float] = {"step": int(step)}
        for recorder in self.recorders:
            row.update(recorder.record(model, int(step)))
        save_checkpoint(self._work / layout.checkpoint_name(step), model.state_dict(),
                        step=int(step), epoch=epoch, learning_rate=lr)
        row.update({k: v for k, v in (("epoch", epoch), ("lr", lr)) if v is not None})
        row.update(metrics or {})
        self._writer.log_row(row)
        return row

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._close(exc)
        return False

    def _close(self, exc: BaseException | None) -> None:
        writer, work = self._writer, self._work
        try:
            if exc is not None:
                writer.abort(exc)
                return
            try:
                self._write_tables(work)
                writer.finish(work)
            except BaseException as failure:
                writer.abort(failure)
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _write_tables(self, work: Path) -> None:
        train_rec, test_rec = self.recorders
        train_rec.table().write(work / layout.TRAIN_LOSSES)
        test_rec.table().write(work / layout.TEST_LOSSES)
        layout.write_examples(
            work / layout.EXAMPLES,
            train_ids=self.train.example_ids, train_labels=self.train.labels.cpu().numpy(),
            original_train_labels=self.original_train_labels, flipped_ids=self.flipped_ids,
            test_ids=self.test.example_ids, test_labels=self.test.labels.cpu().numpy(),
        )
        layout.write_json(work / layout.MODEL_SPEC, self.model_spec)
        layout.write_manifest(work)


def _as_split(data: SplitLike, name: str) -> Split:
    if isinstance(data, Split):
        return data
    try:
        ids, features, labels = data
    except (TypeError, ValueError):
        raise ContractError(f"ContractLogger: {name} must be a Split or (example_ids, features, labels)") from None
    return Split(np.asarray(ids, dtype=np.int64), torch.as_tensor(features), torch.as_tensor(labels))
