"""A contract run's final model in the MLflow Model Registry: logged, registered, aliased.

A run trained by a built-in recipe, the LM recipe or the Hugging Face callback logs its final model as
an MLflow pyfunc model (``served_model``: safetensors weights + model spec, never pickled), linked to the
run, and registers it as a new version of the registered model named after its recipe or experiment.
The run's tags say which: ``z0inf.model`` (the model URI, or ``none``), ``z0inf.registered_model``,
``z0inf.model_version``. A run logged by an outside loop may name its own MLflow model instead, or none.

Aliases (``champion``, ``challenger``) are only moved by the promotion step; every move is written
into the version's tags, so the registry tells its own history.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..errors import ContractError
from . import served_model

MODEL_TAG = "z0inf.model"
REGISTERED_MODEL_TAG = "z0inf.registered_model"
MODEL_VERSION_TAG = "z0inf.model_version"
NO_MODEL = "none"
CHECKPOINT_MODEL = "checkpoint"  # ContractLogger / Z0InfCallback: build the model from the final weights
CHAMPION, CHALLENGER = "champion", "challenger"
ALIAS_HISTORY_TAG = "z0inf.alias_history"
_MODEL_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_TAG_LIMIT = 4000  # characters of a model version tag value kept well under MLflow's limit
_LOGGED_MODEL_PREFIX = "m-"  # MLflow 3's logged model ids
_OWN_MODEL_URI = re.compile(r"^(models|runs):/\S+$")


def registered_model_name(base: str) -> str:
    """A registry name from a recipe or experiment name: letters, digits, ``_ . -`` (others become ``-``)."""
    name = _MODEL_NAME.sub("-", base).strip("-")
    return name or "z0inf-model"


def check_model_option(model: str | None) -> None:
    """``model`` of a ContractLogger: None, ``"checkpoint"`` or an MLflow model URI of the team's own."""
    if model is None or model == CHECKPOINT_MODEL or _OWN_MODEL_URI.match(model):
        return
    raise ContractError(
        f"ContractLogger: model={model!r} must be None (no model: promotion is skipped), {CHECKPOINT_MODEL!r} "
        "(built from the final weights) or an MLflow model URI ('models:/...', 'runs:/...')"
    )


def _pip_requirements(task: str) -> list[str]:
    """The packages the loader needs, at the versions that logged the model (nothing is inferred by
    loading the model in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    packages = ["z0inf-pipeline", "mlflow", "torch", "safetensors", "numpy"] + (
        ["transformers"] if task == "causal_lm" else []
    )
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_checkpoint_model(
    client: MlflowClient,
    run_id: str,
    *,
    model_spec: Mapping[str, Any],
    weights: Path,
    input_example: Any,
    registered_model: str,
) -> str:
    """Log the pyfunc model built from ``weights`` (safetensors) and ``model_spec`` as a model of run
    ``run_id``, register it as a new version of ``registered_model``; tag the run; return the version."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    task = served_model.task_of(model_spec)
    with tempfile.TemporaryDirectory(prefix="z0inf-model-") as tmp:
        data = Path(tmp) / "data"
        served_model.write_model_folder(data, model_spec, weights)
        output = served_model.predictor_from_folder(data).predict(input_example)
        folder = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(folder),
            loader_module=served_model.__name__,
            data_path=str(data),
            signature=infer_signature(input_example, output),
            input_example=input_example,
            pip_requirements=_pip_requirements(task),
            metadata={"z0inf.task": task, "z0inf.run_id": run_id},
        )
        run = client.get_run(run_id)
        logged = client.create_logged_model(
            run.info.experiment_id, name="model", source_run_id=run_id, tags={"z0inf.task": task}
        )
        client.log_model_artifacts(logged.model_id, str(folder))
        client.finalize_logged_model(logged.model_id, "READY")
    return register_model(client, run_id, f"models:/{logged.model_id}", registered_model)


def register_model(client: MlflowClient, run_id: str, model_uri: str, registered_model: str) -> str:
    """Register ``model_uri`` (the run's own model) as a new version of ``registered_model``; tag the run.
    A logged model (``models:/<model id>``) is registered from its artifact location, which this client
    resolves: a local registry store would otherwise look the id up in the process's default store."""
    source, model_id = model_uri, None
    if model_uri.startswith(f"models:/{_LOGGED_MODEL_PREFIX}") and "/" not in model_uri[len("models:/"):]:
        model_id = model_uri[len("models:/"):]
        source = client.get_logged_model(model_id).artifact_location
    try:
        client.get_registered_model(registered_model)
    except MlflowException:
        try:
            client.create_registered_model(
                registered_model, description="Registered by z0inf-pipeline; aliases moved by its promotion step"
            )
        except MlflowException:
            client.get_registered_model(registered_model)  # created meanwhile by another process
    version = client.create_model_version(registered_model, source, run_id=run_id, model_id=model_id)
    client.set_tag(run_id, MODEL_TAG, model_uri)
    client.set_tag(run_id, REGISTERED_MODEL_TAG, registered_model)
    client.set_tag(run_id, MODEL_VERSION_TAG, str(version.version))
    return str(version.version)


@dataclass(frozen=True)
class FinalModel:
    """What a finishing contract run logs as its model: safetensors ``weights`` with their ``model_spec``
    and an ``input_example`` (a pyfunc model is built), or ``uri``, a model the team logged itself."""

    registered_model: str
    weights: Path | None = None
    model_spec: Mapping[str, Any] | None = None
    input_example: Any = None
    uri: str | None = None

    def log(self, client: MlflowClient, run_id: str) -> str:
        """Log (or adopt) and register the model; return its version."""
        if self.uri is not None:
            return register_model(client, run_id, self.uri, self.registered_model)
        return log_checkpoint_model(client, run_id, model_spec=self.model_spec, weights=self.weights,
                                    input_example=self.input_example, registered_model=self.registered_model)


def log_final_model(client: MlflowClient, run_id: str, model: FinalModel | None) -> None:
    """Register ``model`` for the run, or tag the run ``z0inf.model=none`` (its retrains skip promotion)."""
    if model is None:
        client.set_tag(run_id, MODEL_TAG, NO_MODEL)
    else:
        model.log(client, run_id)


@dataclass(frozen=True)
class RegisteredVersion:
    """A run's registered model version, as its tags name it."""

    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_version(tags: Mapping[str, str]) -> RegisteredVersion | None:
    """The version a run registered, from its tags; None for a run without a model."""
    name, version = tags.get(REGISTERED_MODEL_TAG), tags.get(MODEL_VERSION_TAG)
    return RegisteredVersion(name, version) if name and version else None


def aliased_version(client: MlflowClient, name: str, alias: str) -> RegisteredVersion | None:
    try:
        return RegisteredVersion(name, str(client.get_model_version_by_alias(name, alias).version))
    except MlflowException:
        return None


def move_alias(client: MlflowClient, version: RegisteredVersion, alias: str, record: Mapping[str, Any]) -> None:
    """Point ``alias`` at ``version`` and write the move into the tags of the version that gets it (and of
    the one that loses it): ``z0inf.<alias>.*`` with who, the gate and the interval, and one line more in
    ``z0inf.alias_history``."""
    previous = aliased_version(client, version.name, alias)
    event = {"alias": alias, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    client.set_registered_model_alias(version.name, alias, version.version)
    for key, value in event.items():
        client.set_model_version_tag(version.name, version.version, f"z0inf.{alias}.{key}", _tag_value(value))
    _append_history(client, version, event)
    if previous is not None and previous.version != version.version:
        _append_history(client, previous, {**event, "alias": f"{alias} moved to version {version.version}"})


def _append_history(client: MlflowClient, version: RegisteredVersion, event: Mapping[str, Any]) -> None:
    tags = client.get_model_version(version.name, version.version).tags
    history = json.loads(tags.get(ALIAS_HISTORY_TAG, "[]"))
    history.append({k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in event.items()})
    while len(json.dumps(history)) > _TAG_LIMIT and len(history) > 1:  # the oldest moves give way
        history.pop(0)
    client.set_model_version_tag(version.name, version.version, ALIAS_HISTORY_TAG, json.dumps(history))


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps([float(v) for v in value])
    return str(value)
