"""Where the project keeps its local state (MLflow store, caches, review decisions)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigurationError

DATA_DIR_ENV = "Z0INF_DATA_DIR"


def data_dir() -> Path:
    """The project's data directory: ``$Z0INF_DATA_DIR``, else ``./data`` under the working directory.

    Created on first use; a folder that cannot be created or written is a ConfigurationError naming it."""
    path = Path(os.environ.get(DATA_DIR_ENV) or Path.cwd() / "data").resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"data directory {path} (${DATA_DIR_ENV}): cannot be created ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"data directory {path} (${DATA_DIR_ENV}): not writable by this user")
    return path
