"""A run's lineage: the run, the run it was retrained from, that run's parent, and so on."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import InputError
from .contract import PARENT_TAG

MAX_LINEAGE_DEPTH = 100


def run_lineage(run_id: str, client: MlflowClient, *, max_depth: int = MAX_LINEAGE_DEPTH) -> list[str]:
    """``[run_id, parent, grandparent, ...]`` following the ``z0inf.parent_run_id`` tag.

    A parent that no longer exists ends the chain (its decisions are still honoured if its id is in
    the chain); a cycle or a chain longer than ``max_depth`` is an error naming the runs involved.
    """
    lineage = [run_id]
    while True:
        try:
            parent = client.get_run(lineage[-1]).data.tags.get(PARENT_TAG)
        except MlflowException:
            if len(lineage) == 1:
                raise InputError(f"run lineage: MLflow run {run_id} does not exist") from None
            return lineage
        if not parent:
            return lineage
        if parent in lineage:
            raise InputError(f"run lineage of {run_id}: cycle through {parent} ({' -> '.join(lineage)})")
        if len(lineage) > max_depth:
            raise InputError(f"run lineage of {run_id}: longer than {max_depth} runs; stopped at {parent}")
        lineage.append(parent)
