"""Where the project keeps its local state (MLflow store, caches, review decisions)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "Z0INF_DATA_DIR"


def data_dir() -> Path:
    """The project's data directory: ``$Z0INF_DATA_DIR``, else ``./data`` under the working directory."""
    path = Path(os.environ.get(DATA_DIR_ENV) or Path.cwd() / "data").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
