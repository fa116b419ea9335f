"""Reading contract runs back: list them, download one safely into a local cache, validate it.

A download goes to a hidden temporary folder inside the cache, is validated there (every file
against the manifest, every checkpoint, both loss tables, the examples table, tags, params and
metrics), and only then is renamed to ``<cache>/<run_id>``: a rejected run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from ..errors import StorageError, Z0infError
from ..influence.checkpoints import load_state_dict
from ..settings import data_dir
from ..training import layout
from ..training.models import ModelSpec, build_model
from .client import tracking_client
from .config import TRUSTED_FACTORIES_ENV, trusted_factory_prefixes
from .contract import (
    CONTRACT_TAG,
    OPTIONAL_STEP_METRICS,
    REQUIRED_METRICS,
    SUPPORTED_VERSIONS,
    ContractError,
    RunFiles,
    check_artifact_path,
    check_metrics,
    check_tags_and_params,
    read_manifest,
    safe_destination,
    validate_run_folder,
)

ARTIFACTS = "artifacts"
RUN_INFO = "run.json"
_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    status: str
    start_time: int
    experiment_id: str
    tags: dict
    metrics: dict = field(default_factory=dict)  # latest value of each metric


@dataclass
class ContractRun:
    """A downloaded, validated run: local paths into ``cache_dir`` plus what MLflow knows about it."""

    run_id: str
    checkpoints: list[Path]
    train_losses: Path
    test_losses: Path
    examples: Path
    model_spec: dict
    train_config: dict | None
    params: dict
    tags: dict
    cache_dir: Path
    steps: list[int] = field(default_factory=list)

    def build_model(self) -> torch.nn.Module:
        """A fresh network of the run's architecture (weights not loaded)."""
        return model_from_spec(self.model_spec, self.run_id)

    def load_model(self, step: int | None = None) -> torch.nn.Module:
        """The network with the weights of checkpoint ``step`` (default: the last)."""
        if step is not None and step not in self.steps:
            raise ContractError(f"run {self.run_id}: has no checkpoint at step {step} (steps: {self.steps})")
        checkpoint = self.checkpoints[-1 if step is None else self.steps.index(step)]
        model = self.build_model()
        state = load_state_dict(checkpoint)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # A tied weight (a language model's output layer is its input embedding) is stored once, as
        # safetensors refuses shared tensors: missing is fine only for a tensor that shares a loaded one's storage.
        tensors = model.state_dict(keep_vars=True)
        loaded = {tensors[k].data_ptr() for k in state if k in tensors}
        untied = [k for k in missing if tensors[k].data_ptr() not in loaded]
        if untied or unexpected:
            raise ContractError(
                f"run {self.run_id}: checkpoint {checkpoint} does not fit the run's model "
                f"(missing {untied[:5]}, unexpected {list(unexpected)[:5]})"
            )
        return model.eval()


# This project's own model builders, named exactly (not by prefix): they only build a network from
# keyword arguments, so the built-in recipes' runs (``z0inf demo --recipe lm``) and the runs of the
# Hugging Face callback (a ``transformers`` class by name, from its config) need no configuration.
BUILTIN_FACTORIES = frozenset(
    {"z0inf_pipeline.training.lm:build_model", "z0inf_pipeline.integrations.hf:model_from_config"}
)


# Callables that load code or files (and would do it with arguments from the run) are refused even under a
# trusted prefix: trusting ``torch`` must not trust ``torch.hub:load``. A backstop by name, not a sandbox.
_LOADING_MODULES = ("torch.hub", "torch.jit", "torch.package", "torch.serialization", "pickle", "marshal",
                    "importlib", "runpy", "builtins", "os", "subprocess", "shutil", "code", "dill", "joblib")
_LOADING_NAMES = ("load", "exec", "eval", "compile", "system", "popen", "spawn", "import", "from_pretrained",
                  "download", "urlopen")


def _loads_code_or_files(module_name: str, attribute: str) -> bool:
    in_module = any(module_name == m or module_name.startswith(f"{m}.") for m in _LOADING_MODULES)
    return in_module or any(word in attribute.lower() for word in _LOADING_NAMES)


def check_factory_trusted(run_id: str, spec: dict) -> None:
    """Refuse a ``factory`` model spec unless it is one of this project's own builders or its module is
    under a trusted prefix (``$Z0INF_TRUSTED_FACTORIES``, empty by default): rebuilding the model imports
    and calls it, so ``os:system`` would run a command."""
    if "factory" not in spec:
        return
    factory = str(spec["factory"])
    module_name, _, attribute = factory.partition(":")
    trusted = trusted_factory_prefixes()
    allowed = factory in BUILTIN_FACTORIES or any(module_name == p or module_name.startswith(f"{p}.") for p in trusted)
    if not allowed or not attribute:
        raise ContractError(
            f"run {run_id}: model spec factory {factory!r} is not in a trusted module (${TRUSTED_FACTORIES_ENV}: "
            f"{list(trusted) or 'empty'}); nothing was imported. Add its package to ${TRUSTED_FACTORIES_ENV} "
            "only if you trust the code it names"
        )
    if factory not in BUILTIN_FACTORIES and _loads_code_or_files(module_name, attribute):
        raise ContractError(
            f"run {run_id}: model spec factory {factory!r} loads code or files (with arguments from the run); "
            "such callables are refused even under a trusted prefix. Name a function that only builds the network"
        )


def model_from_spec(spec: dict, run_id: str = "(model spec)") -> torch.nn.Module:
    """Build a network from a run's model spec. A ``factory`` spec imports ``module:function`` from the
    installed packages (never a file from the run), and only from trusted modules (``check_factory_trusted``)."""
    if "factory" not in spec:
        return build_model(ModelSpec.from_dict(spec))
    check_factory_trusted(run_id, spec)
    module_name, _, attribute = str(spec["factory"]).partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ContractError(f"model spec factory {spec['factory']!r}: cannot be imported ({exc})") from None
    return factory(**spec.get("kwargs", {}))


def default_cache_dir() -> Path:
    return data_dir() / "cache" / "runs"


def list_contract_runs(
    *,
    tracking_uri: str | None = None,
    status: str | None = "FINISHED",
    experiment_names: list[str] | None = None,
) -> list[RunSummary]:
    """Runs tagged with a contract version this reader understands (``status=None``: any status), oldest first."""
    client = tracking_client(tracking_uri)
    if experiment_names is None:
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    else:
        experiments = [e for e in map(client.get_experiment_by_name, experiment_names) if e is not None]
    if not experiments:
        return []
    query = f"tags.`{CONTRACT_TAG}` LIKE '%'"  # MLflow has no IN for tags: versions are filtered below
    if status:
        query += f" and attributes.status = '{status.upper()}'"
    summaries: list[RunSummary] = []
    token = None
    while True:
        page = client.search_runs(
            [e.experiment_id for e in experiments], query, run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000, order_by=["attributes.start_time ASC"], page_token=token,
        )
        summaries += [
            RunSummary(r.info.run_id, r.info.run_name, r.info.status, r.info.start_time, r.info.experiment_id,
                       dict(r.data.tags), dict(r.data.metrics))
            for r in page
            if r.data.tags.get(CONTRACT_TAG) in SUPPORTED_VERSIONS
        ]
        token = page.token
        if not token:
            return summaries


def fetch_run(
    run_id: str,
    *,
    tracking_uri: str | None = None,
    cache_dir: Path | None = None,
    refresh: bool = False,
) -> ContractRun:
    """Download and validate a contract run into ``cache_dir/<run_id>`` (the cache is reused unless
    ``refresh``); raise ContractError saying what is missing or malformed."""
    layout.check_run_id(run_id, ContractError)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / run_id
    if final.is_dir() and not refresh:
        try:
            return _open_cached(run_id, final)
        except ContractError:
            pass  # damaged cache entry: download afresh below
    replace = final.is_dir()  # a damaged entry, or refresh asked for
    client = tracking_client(tracking_uri)
    work = Path(tempfile.mkdtemp(prefix=f".{run_id}.", suffix=".partial", dir=root))
    try:
        info, _ = _download_validated(client, run_id, work)
        layout.write_json(work / RUN_INFO, info)
        _move_into_place(work, final, replace=replace)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _open_cached(run_id, final)


def validate_run(run_id: str, *, tracking_uri: str | None = None) -> RunFiles:
    """Check a run against the contract without touching the cache (downloads to a throwaway folder)."""
    client = tracking_client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="z0inf-validate-") as tmp:
        return _download_validated(client, run_id, Path(tmp))[1]


def _download_validated(client: MlflowClient, run_id: str, work: Path) -> tuple[dict, RunFiles]:
    """Download the run's contract files into ``work/artifacts`` and validate everything."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ContractError(f"run {run_id}: not found at {client.tracking_uri} ({exc.message})") from None
    if run.info.status != "FINISHED":
        raise ContractError(f"run {run_id}: status is {run.info.status}; only FINISHED runs hold a complete contract")
    tags, params = dict(run.data.tags), dict(run.data.params)
    check_tags_and_params(run_id, tags, params)

    listed = list_artifacts(client, run_id)
    if layout.MANIFEST not in listed:
        missing = [f for f in (layout.MANIFEST, *layout.REQUIRED_FILES) if f not in listed]
        raise ContractError(f"run {run_id}: artifact(s) {missing} are missing")
    artifacts = work / ARTIFACTS
    artifacts.mkdir()
    download_artifact(client, run_id, layout.MANIFEST, artifacts)
    manifest = read_manifest(run_id, artifacts)
    absent = [e["path"] for e in manifest["files"] if e["path"] not in listed]
    if absent:
        raise ContractError(f"run {run_id}: artifact(s) {absent} are listed in the manifest but missing from the run")
    for entry in manifest["files"]:
        download_artifact(client, run_id, entry["path"], artifacts)

    files = validate_run_folder(artifacts, run_id=run_id)
    check_factory_trusted(run_id, files.model_spec)
    check_tags_and_params(run_id, tags, params, files)
    histories = {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in (*REQUIRED_METRICS, *OPTIONAL_STEP_METRICS)
    }
    check_metrics(run_id, histories, files)
    info = {"run_id": run_id, "experiment_id": run.info.experiment_id, "status": run.info.status,
            "tracking_uri": client.tracking_uri, "tags": tags, "params": params}
    return info, files


def list_artifacts(client: MlflowClient, run_id: str) -> set[str]:
    """Every artifact file of the run, each name checked before anything is downloaded."""
    files: set[str] = set()
    pending: list[str | None] = [None]
    while pending:
        folder = pending.pop()
        try:
            entries = client.list_artifacts(run_id, folder)
        except (MlflowException, OSError) as exc:  # OSError: a local store holding a symlink loop, say
            where = folder or "/"
            raise ContractError(f"run {run_id}: cannot list artifacts under {where!r} ({_reason(exc)})") from None
        for entry in entries:
            check_artifact_path(run_id, entry.path)
            (pending.append(entry.path) if entry.is_dir else files.add(entry.path))
    return files


def download_artifact(client: MlflowClient, run_id: str, path: str, root: Path) -> None:
    """Download one checked artifact file to ``root / path`` (MLflow puts a file into ``dst_path`` by its base name)."""
    destination = safe_destination(run_id, root, path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with no_progress_bars():
            local = Path(client.download_artifacts(run_id, path, dst_path=str(destination.parent)))
    except (MlflowException, OSError) as exc:
        raise download_failure(run_id, path, destination.parent, exc) from None
    if local.resolve() != destination or not destination.is_file():
        raise ContractError(f"run {run_id}: artifact {path!r} did not arrive at {destination}")


# Less free space than this in the download folder after a failed download: the disk filled up.
_NEARLY_FULL_BYTES = 1 << 20


def download_failure(run_id: str, path: str, folder: Path, exc: Exception) -> Z0infError:
    """The named error for a failed artifact download. A full disk (``ENOSPC``, raised here or reported
    in MLflow's message) is a ``StorageError`` naming the folder: MLflow's ``runs:/`` download swallows
    the OSError and says "please ensure that the path is correct", so a folder left with under 1 MiB
    free after the failure counts as full too. Anything else: the run's artifact cannot be downloaded."""
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
        isinstance(exc, MlflowException)
        and ("No space left on device" in exc.message or _free_bytes(folder) < _NEARLY_FULL_BYTES)
    )
    if full:
        return StorageError(
            f"run {run_id}: artifact {path!r} cannot be downloaded: the disk holding {folder} is full "
            f"({_free_bytes(folder):,} bytes free); free space there or set $Z0INF_DATA_DIR to a folder on a larger disk"
        )
    return ContractError(f"run {run_id}: artifact {path!r} cannot be downloaded ({_reason(exc)})")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return _NEARLY_FULL_BYTES  # cannot tell: not counted as full


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, MlflowException) else f"{exc.strerror}: {exc.filename}"


@contextlib.contextmanager
def no_progress_bars():
    """MLflow draws a progress bar for every single-file download; the caller reports progress itself."""
    previous = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = previous


def _move_into_place(work: Path, final: Path, *, replace: bool) -> None:
    """Rename the validated download onto ``final``. If another process got there first, its entry is
    kept unless ``replace``; a replaced entry is only deleted once the new one is in place."""
    try:
        work.rename(final)
        return
    except OSError:
        if not final.is_dir():
            raise
    if not replace:
        return
    stale = final.with_name(f".{final.name}.stale-{work.name}")
    final.rename(stale)
    work.rename(final)
    shutil.rmtree(stale, ignore_errors=True)


def _open_cached(run_id: str, folder: Path) -> ContractRun:
    """A cache entry, checked cheaply: its files were hashed against the manifest when downloaded."""
    files = validate_run_folder(folder / ARTIFACTS, run_id=run_id, verify_hashes=False)
    check_factory_trusted(run_id, files.model_spec)  # the list may have narrowed since it was cached
    info = layout.read_json(folder / RUN_INFO) if (folder / RUN_INFO).is_file() else None
    if info is None or info.get("run_id") != run_id:
        raise ContractError(f"run {run_id}: cache entry {folder} has no matching {RUN_INFO}")
    artifacts = folder / ARTIFACTS
    return ContractRun(
        run_id=run_id, checkpoints=[c.path for c in files.checkpoints],
        train_losses=artifacts / layout.TRAIN_LOSSES, test_losses=artifacts / layout.TEST_LOSSES,
        examples=artifacts / layout.EXAMPLES, model_spec=files.model_spec, train_config=files.train_config,
        params=info["params"], tags=info["tags"], cache_dir=folder, steps=files.steps,
    )
