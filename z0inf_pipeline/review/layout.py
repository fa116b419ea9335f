"""Where the pipeline keeps one MLflow run's outputs: ``data_dir()/runs/<run_id>/``.

Dagster assets write here, the review CLI and the demo read here; one definition keeps them in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..influence.errors import InfluenceInputError
from ..settings import data_dir

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """MLflow run ids are hex strings; anything else (a path, '..') is refused before it names a folder."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InfluenceInputError(f"run id {run_id!r}: not an MLflow run id (letters, digits, '_' and '-' only)")
    return run_id


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's pipeline outputs (every file is written atomically by its asset)."""

    run_id: str
    root: Path

    @classmethod
    def for_run(cls, run_id: str, base: Path | None = None) -> "RunLayout":
        base = data_dir() if base is None else Path(base)
        return cls(check_run_id(run_id), base / "runs" / run_id)

    @property
    def examples(self) -> Path:
        return self.root / "examples.parquet"

    @property
    def train_losses(self) -> Path:
        return self.root / "loss_tables" / "train.parquet"

    @property
    def test_losses(self) -> Path:
        return self.root / "loss_tables" / "test.parquet"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def gram(self) -> Path:
        return self.root / "gram.parquet"

    @property
    def self_influence(self) -> Path:
        return self.root / "self_influence.parquet"

    @property
    def topk(self) -> Path:
        return self.root / "train_test_topk.parquet"

    @property
    def review_queue(self) -> Path:
        return self.root / "review_queue.parquet"

    @property
    def histogram(self) -> Path:
        return self.root / "self_influence_histogram.png"

    @property
    def flagged_grid(self) -> Path:
        return self.root / "flagged_examples.png"

    @property
    def curated_set(self) -> Path:
        return self.root / "curated_training_set.parquet"

    @property
    def retrained(self) -> Path:
        return self.root / "retrained_run.parquet"
