"""The MLflow side: the run contract, writing contract runs, and reading them back safely."""

from .client import ensure_experiment, tracking_client
from .config import MlflowConfig, active_config, embedded_config, load_mlflow_config, resolve_tracking_uri
from .curation import Curation, curation_of
from .contract import CONTRACT_TAG, CONTRACT_VERSION, ContractError, RunFiles, validate_run_folder
from .lineage import run_lineage
from .logger import ContractLogger, train_and_log
from .reader import (
    ContractRun,
    RunSummary,
    default_cache_dir,
    fetch_run,
    list_contract_runs,
    model_from_spec,
    validate_run,
)

__all__ = [
    "CONTRACT_TAG",
    "CONTRACT_VERSION",
    "ContractError",
    "ContractLogger",
    "ContractRun",
    "Curation",
    "MlflowConfig",
    "RunFiles",
    "RunSummary",
    "active_config",
    "curation_of",
    "default_cache_dir",
    "embedded_config",
    "ensure_experiment",
    "fetch_run",
    "run_lineage",
    "list_contract_runs",
    "load_mlflow_config",
    "model_from_spec",
    "resolve_tracking_uri",
    "tracking_client",
    "train_and_log",
    "validate_run",
    "validate_run_folder",
]
