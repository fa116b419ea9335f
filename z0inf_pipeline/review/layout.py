"""Where the pipeline keeps one MLflow run's outputs: ``<outputs base>/runs/<run_id>/``.

The base is resolved once, by ``outputs_base`` (the only reader of ``$Z0INF_OUTPUTS_URL``): Dagster
through the IO manager resource (``RunOutputsIOManager.base_url``, else the environment), the CLI at
the start of a command; every reader is then handed it. Any fsspec URL works (``s3://bucket/z0inf``,
``memory://``, ...). Paths are ``universal_pathlib`` UPaths: on the local disk ordinary paths.

Dagster's IO manager writes here (``RUN_OUTPUTS`` says which files belong to which asset), the
review CLI, the demo and the review page read here; this one definition keeps them in step.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from upath import UPath

from ..influence.errors import InfluenceInputError
from ..settings import data_dir

OUTPUTS_URL_ENV = "Z0INF_OUTPUTS_URL"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")

# The RunLayout properties each asset's output is stored in, first the asset's main file.
RUN_OUTPUTS: dict[str, tuple[str, ...]] = {
    "training_run": ("examples",),
    "loss_tables": ("train_losses", "test_losses", "predictions"),
    "weight_gram": ("gram",),
    "self_influence": ("self_influence",),
    "train_test_influence": ("topk",),
    "review_queue": ("review_queue", "histogram", "flagged_grid", "review_sheet", "review_table_csv", "review_table_html"),
    "curated_training_set": ("curated_set",),
    "retrained_run": ("retrained",),
    "model_promotion": ("promotion",),
}


def check_run_id(run_id: str) -> str:
    """MLflow run ids are hex strings; anything else (a path, '..') is refused before it names a folder."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InfluenceInputError(f"run id {run_id!r}: not an MLflow run id (letters, digits, '_' and '-' only)")
    return run_id


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

    def files_of(self, asset: str) -> dict[str, UPath]:
        """The files an asset's output is stored in, by RunLayout property name."""
        if asset not in RUN_OUTPUTS:
            raise InfluenceInputError(f"asset {asset!r}: has no files in a run's outputs (known: {sorted(RUN_OUTPUTS)})")
        return {name: getattr(self, name) for name in RUN_OUTPUTS[asset]}

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
