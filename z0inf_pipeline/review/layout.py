"""Where the pipeline keeps one MLflow run's outputs: ``<outputs base>/runs/<run_id>/``.

The base is resolved once, by ``outputs_base`` (the only reader of ``$Z0INF_OUTPUTS_URL``): Dagster
through the IO manager resource (``RunOutputsIOManager.base_url``, else the environment), the CLI at
the start of a command; every reader is then handed it. Any fsspec URL works (``s3://bucket/z0inf``,
``memory://``, ...). Paths are ``universal_pathlib`` UPaths: on the local disk ordinary paths.

Dagster's IO manager writes here (``defs.storage.ASSET_FILES`` says which of these files belong to which
asset), the review CLI, the demo and the review page read here; this one definition keeps them in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from upath import UPath

from ..settings import data_dir
from ..training.layout import check_run_id

OUTPUTS_URL_ENV = "Z0INF_OUTPUTS_URL"



def outputs_base(base: str | os.PathLike | None = None) -> UPath:
    """The folder that holds ``runs/``: ``base``, else ``$Z0INF_OUTPUTS_URL``, else the data directory
    (``$Z0INF_DATA_DIR``, default ``./data``). The one place the environment names it."""
    chosen = base if base is not None else os.environ.get(OUTPUTS_URL_ENV) or data_dir()
    return UPath(chosen)


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's pipeline outputs (each written whole, by the IO manager, under a temporary name)."""

    run_id: str
    root: UPath

    @classmethod
    def for_run(cls, run_id: str, base: str | os.PathLike) -> "RunLayout":
        """The run's folder under ``base``, the outputs base ``outputs_base`` resolved."""
        return cls(check_run_id(run_id), UPath(base) / "runs" / run_id)

    @property
    def gx_folder(self) -> Path:
        """The run's GX validation results and Data Docs (``uncommitted/data_docs/local_site/index.html``).
        GX's stores write to the local disk: the run's outputs folder when that is local, else its local
        mirror under the data directory (both are logged to the MLflow run under ``gx/``)."""
        if getattr(self.root, "protocol", "") in ("", "file", "local"):
            return Path(self.root.path) / "gx"
        return data_dir() / "runs" / self.run_id / "gx"

    @property
    def examples(self) -> UPath:
        return self.root / "examples.parquet"

    @property
    def train_losses(self) -> UPath:
        return self.root / "loss_tables" / "train.parquet"

    @property
    def test_losses(self) -> UPath:
        return self.root / "loss_tables" / "test.parquet"

    @property
    def predictions(self) -> UPath:
        return self.root / "predictions.parquet"

    @property
    def gram(self) -> UPath:
        return self.root / "gram.parquet"

    @property
    def self_influence(self) -> UPath:
        return self.root / "self_influence.parquet"

    @property
    def topk(self) -> UPath:
        return self.root / "train_test_topk.parquet"

    @property
    def review_queue(self) -> UPath:
        return self.root / "review_queue.parquet"

    @property
    def review_queue_attempt(self) -> UPath:
        """Written when a ``review_queue`` materialisation starts (its Dagster run id), removed once its
        queue is published: while it is there the queue on disk is not the latest attempt's."""
        return self.root / "review_queue.attempt.json"

    @property
    def histogram(self) -> UPath:
        return self.root / "flag_score_histogram.png"

    @property
    def review_sheet(self) -> UPath:
        """The self-contained HTML review sheet (MLflow previews HTML, not parquet)."""
        return self.root / "review_sheet.html"

    @property
    def review_table_csv(self) -> UPath:
        return self.root / "review_queue.csv"

    @property
    def review_table_html(self) -> UPath:
        return self.root / "review_queue.html"

    @property
    def flagged_grid(self) -> UPath:
        return self.root / "flagged_examples.png"

    @property
    def curated_set(self) -> UPath:
        return self.root / "curated_training_set.parquet"

    @property
    def retrained(self) -> UPath:
        return self.root / "retrained_run.parquet"

    @property
    def promotion(self) -> UPath:
        return self.root / "model_promotion.parquet"
