"""Writing contract runs: ``train_and_log`` for this project's recipes, ``ContractLogger`` for any PyTorch loop."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from ..errors import StorageError
from ..influence.checkpoints import save_checkpoint
from ..influence.loss_tables import ID_COLUMN, LossFn
from ..training import layout
from ..training.datasets import Split
from ..training.models import ModelSpec
from ..training.recording import (
    BatchLossFn,
    BatchLossRecorder,
    IdsFn,
    SplitRecorder,
    cross_entropy_per_example,
    ids_from_batch,
)
from ..training.trainer import TrainConfig, plan_training, train
from .client import ensure_experiment, tracking_client
from .registry import CHECKPOINT_MODEL, FinalModel, check_model_option, log_final_model, registered_model_name
from .served_model import LM_INPUTS, full_state, task_of
from .contract import (
    CHECKPOINT_PARAMETERS_TAG,
    CONTRACT_TAG,
    CONTRACT_VERSION,
    DATASET_TAG,
    LOSS_TAG,
    NUM_CHECKPOINTS_TAG,
    PARENT_TAG,
    SOURCE_TAG,
    ContractError,
    check_run_folder,
)

MLFLOW_PARENT_TAG = "mlflow.parentRunId"


class RunWriter:
    """One MLflow run with the contract tags: metrics as they come, the artifact folder at the end."""

    def __init__(self, client: MlflowClient, experiment: str, *, run_name: str | None, tags: Mapping[str, Any],
                 parent_run_id: str | None, nested_in: str | None = None) -> None:
        """``parent_run_id``: the run this one retrains; ``nested_in``: a run it is only shown under (the
        run a framework's own MLflow reporting opened, say)."""
        all_tags = {CONTRACT_TAG: CONTRACT_VERSION, **{k: str(v) for k, v in tags.items()}}
        if nested_in:
            all_tags[MLFLOW_PARENT_TAG] = nested_in
        if parent_run_id:
            all_tags.update({PARENT_TAG: parent_run_id, MLFLOW_PARENT_TAG: parent_run_id})
        self.client = client
        experiment_id = ensure_experiment(client, experiment)
        name = None if run_name is None else unique_run_name(client, experiment_id, run_name)
        self.run_id = client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])

    def log_row(self, row: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        step = int(row["step"])
        metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "step"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, folder: Path, model: FinalModel | None) -> None:
        """Validate the folder as a reader would, upload it, log and register the final ``model`` (None: the
        run has none), and only then mark the run finished: the sensor never sees a run without its model."""
        checkpoints = check_run_folder(folder, run_id=self.run_id)
        self.client.log_artifacts(self.run_id, str(folder))
        self.client.set_tag(self.run_id, NUM_CHECKPOINTS_TAG, str(checkpoints))
        log_final_model(self.client, self.run_id, model)
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def abort(self, exc: BaseException) -> None:
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))

    def store_refused(self, exc: Exception) -> StorageError:
        """The named error for an MLflow store that stopped taking writes during the run: the run is
        marked FAILED where the store still allows it, and the message says which happened."""
        try:
            self.abort(exc)
            marked = "the run is marked FAILED"
        except (MlflowException, OSError) as again:
            marked = f"the run could not be marked FAILED ({_short(again)}) and stays RUNNING in the store"
        return StorageError(
            f"MLflow store {self.client.tracking_uri}: run {self.run_id} cannot be written ({_short(exc)}); "
            f"{marked}. Make the store and its artifact location writable, then train again"
        )


def _short(exc: BaseException) -> str:
    """An exception's first line, without MLflow's or SQLAlchemy's pages of context."""
    text = exc.message if isinstance(exc, MlflowException) else str(exc)
    return f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0][:300]}"


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
    ``run_name`` defaults to dataset, model and label noise (``digits-mlp-noise0.1``).
    ``integrations.train_and_log_recipe`` also takes the LM recipe."""
    plan = plan_training(config)
    client = tracking_client(tracking_uri)
    dataset = Path(config.dataset).name
    recipe_name = f"{Path(config.dataset).stem}-{config.model}"
    noise = f"-noise{config.label_noise:g}" if config.label_noise else ""
    writer = RunWriter(
        client, experiment, run_name=run_name or f"{recipe_name}{noise}",
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
            final = FinalModel(registered_model_name(recipe_name), weights=result.checkpoints[-1],
                               model_spec=result.model_spec.to_dict(),
                               input_example=result.bundle.test.features[:5].numpy())
            writer.finish(Path(tmp) / "run", final)
    except (MlflowException, OSError) as exc:  # the store or its artifact location stopped taking writes
        raise writer.store_refused(exc) from None
    except BaseException as exc:
        writer.abort(exc)
        raise
    return writer.run_id


_RETRAIN_SUFFIX = re.compile(r"^(?P<base>.*) · retrain (?P<round>\d+)(?: \(\d+\))?$")


def unique_run_name(client: MlflowClient, experiment_id: str, name: str) -> str:
    """``name``, or ``name (2)``, ``name (3)``... when runs of the experiment already carry it: people
    tell runs apart by name (the review page, MLflow's list), so two demos must not share one."""
    prefix = name.split("'")[0]  # the filter's quoting; the names are compared exactly below
    taken = {
        run.info.run_name
        for run in client.search_runs([experiment_id], f"attributes.run_name LIKE '{prefix}%'", max_results=5000)
    }
    if name not in taken:
        return name
    return next(f"{name} ({k})" for k in range(2, len(taken) + 3) if f"{name} ({k})" not in taken)


def retrained_run_name(parent_name: str | None) -> str:
    """The name of a run retrained from ``parent_name``, telling the round: ``digits-mlp · retrain 1``,
    and from that one ``digits-mlp · retrain 2`` (MLflow lists parent and child apart at a glance)."""
    match = _RETRAIN_SUFFIX.match(parent_name or "")
    if match:
        return f"{match['base']} · retrain {int(match['round']) + 1}"
    return f"{parent_name or 'run'} · retrain 1"


SplitLike = Split | tuple[Any, torch.Tensor, torch.Tensor] | Iterable
CHECKPOINT_SELECTIONS = ("all", "trainable")


class ContractLogger:
    """Turn a team's own PyTorch loop into a contract run (contract v2)::

        with ContractLogger(model_spec=spec, train=train_loader, test=probe_loader,
                            loss_fn=per_example_loss, ids_fn=lambda batch: batch["example_id"]) as run:
            for step in ...:
                ...
                if step in checkpoint_steps:
                    run.on_checkpoint(model, step, epoch=epoch, lr=lr)
        print(run.run_id)

    ``train`` / ``test`` are either any re-iterable source of batches (a ``DataLoader`` with
    ``shuffle=False``, a list), with ``loss_fn(model, batch) -> (B,)`` and ``ids_fn(batch)`` (default
    ``batch["example_id"]``): the data never has to sit in memory at once; or, as before, in-memory
    ``(example_ids, features, labels)`` tuples with ``loss_fn(outputs, targets) -> (B,)`` (default:
    cross-entropy). ``examples`` (a DataFrame keyed by ``example_id``) adds per-example columns to
    the examples table: ``label`` (class label; default -1, none), ``prompt`` / ``target`` / ``uri``.
    ``checkpoint_parameters="trainable"`` stores only parameters with ``requires_grad`` (fine-tuning
    often updates few; the Gram reads whatever is stored).

    ``model_spec`` rebuilds the network: a ``ModelSpec``, or ``{"factory": "package.module:function",
    "kwargs": {...}}`` for a network of your own. If the block raises (bad batches, a wrong loss
    shape, NaN losses, a changed probe set), the run is marked FAILED and nothing is uploaded.

    ``model`` is the run's model for the MLflow Model Registry: None (default: no model; a retrain of
    this run skips promotion and says so), ``"checkpoint"`` (the weights of the last ``on_checkpoint``
    as a pyfunc model: a class predictor for a ``ModelSpec``, a causal-LM scorer for a ``factory``
    spec, see ``served_model``), or the URI of an MLflow model the team logged itself. It is registered
    as a new version of ``registered_model`` (default: the experiment's name).
    """

    def __init__(
        self,
        *,
        model_spec: ModelSpec | Mapping[str, Any],
        train: SplitLike,
        test: SplitLike,
        loss_fn: LossFn | BatchLossFn = cross_entropy_per_example,
        ids_fn: IdsFn = ids_from_batch,
        examples: pd.DataFrame | None = None,
        checkpoint_parameters: str = "all",
        loss_name: str | None = None,
        experiment: str = "z0inf",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        nested_in: str | None = None,
        dataset: str = "custom",
        original_train_labels: torch.Tensor | np.ndarray | None = None,
        flipped_ids: np.ndarray | None = None,
        train_config: Mapping[str, Any] | None = None,
        expected_checkpoints: int = 20,
        model: str | None = None,
        registered_model: str | None = None,
    ) -> None:
        self.model_spec = model_spec.to_dict() if isinstance(model_spec, ModelSpec) else dict(model_spec)
        if "factory" not in self.model_spec:
            ModelSpec.from_dict(self.model_spec)
        elif not re.fullmatch(r"[\w.]+:[\w.]+", str(self.model_spec["factory"])):
            raise ContractError(f"ContractLogger: model_spec factory {self.model_spec['factory']!r} is not "
                                "'package.module:function'")
        if checkpoint_parameters not in CHECKPOINT_SELECTIONS:
            raise ContractError(f"ContractLogger: checkpoint_parameters={checkpoint_parameters!r} must be one of "
                                f"{list(CHECKPOINT_SELECTIONS)}")
        self.checkpoint_parameters = checkpoint_parameters
        check_model_option(model)
        self.model, self.registered_model = model, registered_model_name(registered_model or experiment)
        self._final_model: torch.nn.Module | None = None
        self._test_source = test
        in_memory = [_is_in_memory(data) for data in (train, test)]
        if in_memory[0] != in_memory[1]:
            raise ContractError("ContractLogger: train and test must both be in-memory (ids, features, labels) "
                                "or both iterables of batches")
        self.in_memory = in_memory[0]
        if self.in_memory:
            self.train, self.test = (_as_split(train, "train"), _as_split(test, "test"))
            self.recorders = [
                SplitRecorder(split.example_ids, split.features, split.labels, loss_fn=loss_fn,
                              capacity=expected_checkpoints, name=name)
                for name, split in (("train", self.train), ("test", self.test))
            ]
        else:
            self.recorders = [
                BatchLossRecorder(data, loss_fn, ids_fn=ids_fn, capacity=expected_checkpoints, name=name)
                for name, data in (("train", train), ("test", test))
            ]
        self.examples = _example_columns(examples)
        self.original_train_labels = original_train_labels
        if self.in_memory:
            labels = self.train.labels if original_train_labels is None else original_train_labels
            self.original_train_labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
            if len(self.original_train_labels) != len(self.train):
                raise ContractError(f"ContractLogger: {len(self.original_train_labels)} original_train_labels for "
                                    f"{len(self.train)} training examples")
        self.flipped_ids = np.asarray([] if flipped_ids is None else flipped_ids, dtype=np.int64)
        self.train_config = None if train_config is None else dict(train_config)
        self._setup = dict(experiment=experiment, tracking_uri=tracking_uri, run_name=run_name,
                           params=dict(params or {}), tags=dict(tags or {}), parent_run_id=parent_run_id,
                           nested_in=nested_in, dataset=dataset,
                           loss=loss_name or getattr(loss_fn, "__name__", type(loss_fn).__name__))
        self._writer: RunWriter | None = None
        self._work: Path | None = None

    @property
    def run_id(self) -> str:
        if self._writer is None:
            raise ContractError("ContractLogger: the run starts when the `with` block is entered")
        return self._writer.run_id

    def __enter__(self) -> "ContractLogger":
        s = self._setup
        self._writer = RunWriter(
            tracking_client(s["tracking_uri"]), s["experiment"], run_name=s["run_name"],
            tags={SOURCE_TAG: "ContractLogger", DATASET_TAG: s["dataset"], LOSS_TAG: s["loss"],
                  CHECKPOINT_PARAMETERS_TAG: self.checkpoint_parameters, **s["tags"]},
            parent_run_id=s["parent_run_id"], nested_in=s["nested_in"],
        )
        self._work = Path(tempfile.mkdtemp(prefix="z0inf-logger-"))
        try:
            params = dict(s["params"])
            if self.in_memory:
                params.update(n_train=len(self.train), n_test=len(self.test))
            self._writer.log_params(params)
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
        save_checkpoint(self._work / layout.checkpoint_name(step), self._checkpoint_state(model),
                        step=int(step), epoch=epoch, learning_rate=lr)
        row.update({k: v for k, v in (("epoch", epoch), ("lr", lr)) if v is not None})
        row.update(metrics or {})
        self._writer.log_row(row)
        self._final_model = model
        return row

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._close(exc)
        return False

    def _checkpoint_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.checkpoint_parameters == "trainable":
            state = {n: p for n, p in model.named_parameters() if p.requires_grad}
            if not state:
                raise ContractError("ContractLogger: checkpoint_parameters='trainable' but no parameter requires grad")
            return state
        return model.state_dict()

    def _close(self, exc: BaseException | None) -> None:
        writer, work = self._writer, self._work
        try:
            if exc is not None:
                writer.abort(exc)
                return
            try:
                self._write_tables(work)
                if not self.in_memory:
                    train, test = (r.table() for r in self.recorders)
                    writer.log_params({"n_train": len(train.example_ids), "n_test": len(test.example_ids)})
                with tempfile.TemporaryDirectory(prefix="z0inf-final-model-") as weights_dir:
                    writer.finish(work, self._final(Path(weights_dir)))
            except BaseException as failure:
                writer.abort(failure)
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _final(self, weights_dir: Path) -> FinalModel | None:
        """The run's model as ``model`` asks: the final network's every weight in one safetensors file."""
        if self.model is None:
            return None
        if self.model != CHECKPOINT_MODEL:
            return FinalModel(self.registered_model, uri=self.model)
        weights = weights_dir / "model.safetensors"
        save_checkpoint(weights, full_state(self._final_model), step=self.recorders[0].steps[-1])
        return FinalModel(self.registered_model, weights=weights, model_spec=self.model_spec,
                          input_example=self._input_example())

    def _input_example(self) -> Any:
        """A few held-out inputs in the served model's format (features, or the LM's token tensors)."""
        if task_of(self.model_spec) == "causal_lm":
            batch = next(iter(self._test_source))
            return {k: np.asarray(torch.as_tensor(batch[k])[:2].cpu()) for k in LM_INPUTS}
        if self.in_memory:
            return self.test.features[:5].cpu().numpy().astype(np.float32)
        return np.zeros((1, *self.model_spec["input_shape"]), dtype=np.float32)

    def _write_tables(self, work: Path) -> None:
        tables = [recorder.table() for recorder in self.recorders]
        tables[0].write(work / layout.TRAIN_LOSSES)
        tables[1].write(work / layout.TEST_LOSSES)
        train_ids, test_ids = (t.example_ids for t in tables)
        columns = self._columns_for(np.concatenate([train_ids, test_ids]))
        if self.in_memory:
            train_labels, test_labels = self.train.labels.cpu().numpy(), self.test.labels.cpu().numpy()
            original = self.original_train_labels
        else:
            labels = columns.pop("label", np.full(len(train_ids) + len(test_ids), layout.NO_LABEL))
            train_labels, test_labels = labels[: len(train_ids)], labels[len(train_ids) :]
            original = train_labels if self.original_train_labels is None else np.asarray(
                self.original_train_labels, dtype=np.int64)
            if len(original) != len(train_ids):
                raise ContractError(f"ContractLogger: {len(original)} original_train_labels for "
                                    f"{len(train_ids)} training examples")
        columns.pop("label", None)
        unknown_flips = np.setdiff1d(self.flipped_ids, train_ids)
        if len(unknown_flips):
            raise ContractError(f"ContractLogger: flipped_ids {unknown_flips[:5].tolist()} are not training examples")
        layout.write_examples(
            work / layout.EXAMPLES,
            train_ids=train_ids, train_labels=train_labels, original_train_labels=original,
            flipped_ids=self.flipped_ids, test_ids=test_ids, test_labels=test_labels, text=columns,
        )
        layout.write_json(work / layout.MODEL_SPEC, self.model_spec)
        if self.train_config is not None:
            layout.write_json(work / layout.TRAIN_CONFIG, self.train_config)
        layout.write_manifest(work)

    def _columns_for(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The ``examples`` columns in the order of ``ids``; ids it does not describe get no text and label -1."""
        if self.examples is None:
            return {}
        picked = self.examples.reindex(ids)
        columns = {c: np.asarray([None if pd.isna(v) else str(v) for v in picked[c]], dtype=object)
                   for c in layout.TEXT_COLUMNS if c in picked}
        if "label" in picked:
            columns["label"] = picked["label"].fillna(layout.NO_LABEL).to_numpy(np.int64)
        return columns


def _is_in_memory(data: Any) -> bool:
    return isinstance(data, Split) or (isinstance(data, tuple) and len(data) == 3
                                       and isinstance(data[1], (torch.Tensor, np.ndarray)))


def _example_columns(examples: pd.DataFrame | None) -> pd.DataFrame | None:
    if examples is None:
        return None
    if ID_COLUMN not in examples:
        raise ContractError(f"ContractLogger: examples has no {ID_COLUMN!r} column (columns: {list(examples)})")
    unknown = sorted(set(examples.columns) - {ID_COLUMN, "label", *layout.TEXT_COLUMNS})
    if unknown:
        raise ContractError(f"ContractLogger: examples column(s) {unknown} are not among "
                            f"{['label', *layout.TEXT_COLUMNS]}")
    if examples[ID_COLUMN].duplicated().any():
        raise ContractError(f"ContractLogger: examples repeats ids in {ID_COLUMN!r}")
    return examples.set_index(ID_COLUMN)


def _as_split(data: SplitLike, name: str) -> Split:
    if isinstance(data, Split):
        return data
    try:
        ids, features, labels = data
    except (TypeError, ValueError):
        raise ContractError(f"ContractLogger: {name} must be a Split or (example_ids, features, labels)") from None
    return Split(np.asarray(ids, dtype=np.int64), torch.as_tensor(features), torch.as_tensor(labels))
