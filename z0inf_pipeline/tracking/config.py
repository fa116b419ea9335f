"""Which MLflow tracking store to talk to, and where a new experiment's artifacts go.

Precedence: an explicit URI > ``$MLFLOW_TRACKING_URI`` > the config named by ``$Z0INF_MLFLOW_CONFIG``
(a YAML file, or the name of one in ``mlflow_configs/``) > the embedded default: a SQLite store
at ``<data_dir>/mlflow/mlflow.db`` with artifacts in ``<data_dir>/mlflow/artifacts``, made on first use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sqlalchemy.engine import make_url

from ..errors import ConfigurationError
from ..settings import data_dir

CONFIG_ENV = "Z0INF_MLFLOW_CONFIG"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CONFIG_FOLDER = "mlflow_configs"
TRUSTED_FACTORIES_ENV = "Z0INF_TRUSTED_FACTORIES"
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class MlflowConfig:
    """``tracking_uri``; ``artifact_location`` for experiments this project creates (None: the server's default)."""

    tracking_uri: str
    artifact_location: str | None = None


def embedded_config() -> MlflowConfig:
    root = data_dir() / "mlflow"
    return MlflowConfig(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri())


def load_mlflow_config(name_or_path: str) -> MlflowConfig:
    """Read a config file: ``tracking_uri`` (required) and ``artifact_location``; ``$VARS`` are expanded,
    and ``{data_dir}`` stands for the project's data directory."""
    import yaml

    path = _config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"mlflow config {path}: cannot be read ({exc})") from None
    if not isinstance(raw, dict) or not raw.get("tracking_uri"):
        raise ConfigurationError(f"mlflow config {path}: needs a 'tracking_uri' entry")
    unknown = sorted(set(raw) - {"tracking_uri", "artifact_location"})
    if unknown:
        raise ConfigurationError(f"mlflow config {path}: unknown entries {unknown}")

    def expand(value: str | None) -> str | None:
        if value is None:
            return None
        text = os.path.expandvars(str(value)).replace("{data_dir}", str(data_dir()))
        if "$" in text:
            raise ConfigurationError(f"mlflow config {path}: {value!r} uses an environment variable that is not set")
        return text

    return MlflowConfig(expand(raw["tracking_uri"]), expand(raw.get("artifact_location")))


def active_config() -> MlflowConfig:
    """The config file named by ``$Z0INF_MLFLOW_CONFIG``, else the embedded default."""
    name = os.environ.get(CONFIG_ENV)
    return load_mlflow_config(name) if name else embedded_config()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri`` > ``$MLFLOW_TRACKING_URI`` > the active config."""
    return uri or os.environ.get(TRACKING_URI_ENV) or active_config().tracking_uri


def trusted_factory_prefixes() -> tuple[str, ...]:
    """Modules whose functions a run's ``{"factory": "module:function"}`` model spec may name:
    ``$Z0INF_TRUSTED_FACTORIES``, comma-separated package or module names (``my_team.models``),
    empty by default. A factory is imported and called when a model is rebuilt, so only code you
    trust belongs here; a run naming anything else is refused when it is fetched."""
    prefixes = tuple(p.strip() for p in os.environ.get(TRUSTED_FACTORIES_ENV, "").split(",") if p.strip())
    bad = [p for p in prefixes if not _MODULE_NAME.match(p)]
    if bad:
        raise ConfigurationError(f"${TRUSTED_FACTORIES_ENV}: {bad} are not module names (e.g. my_team.models)")
    return prefixes


def artifact_location_for(tracking_uri: str) -> str | None:
    """Where new experiments of this store keep artifacts. A SQLite store gets a folder beside its
    database (MLflow would otherwise write to ./mlruns of whatever the working directory is); a
    server decides for itself (None), unless the active config names a location for this URI."""
    config = active_config()
    if config.tracking_uri == tracking_uri and config.artifact_location:
        return config.artifact_location
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").as_uri() if db is not None else None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI as SQLAlchemy (MLflow's store) reads it: ``sqlite:////abs``
    absolute, ``sqlite:///rel`` relative to the working directory; None for other stores and in memory."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    database = make_url(tracking_uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def prepare_store(tracking_uri: str) -> None:
    """Create a SQLite store's folder and its artifact folder on first use."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    location = artifact_location_for(tracking_uri)
    if location and location.startswith("file:"):
        Path(urlparse(location).path).mkdir(parents=True, exist_ok=True)


def _config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        candidates = [path]
    else:
        candidates = [base / CONFIG_FOLDER / f"{name_or_path}.yaml" for base in (Path.cwd(), _PROJECT_ROOT)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigurationError(
        f"mlflow config {name_or_path!r}: no such file (looked at {[str(c) for c in candidates]})"
    )
