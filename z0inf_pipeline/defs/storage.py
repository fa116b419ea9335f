"""Where asset outputs live: one folder per MLflow run (``RunLayout``), on any fsspec file system.

The ``RunOutputsIOManager`` owns storage. Assets return values and receive their upstream values
as parameters; none of them names a file. Frames are stored as parquet and loaded back as frames;
the loss tables (N examples x T checkpoints, the one output that grows with the data) come back as
``LossTables`` of ``StoredTable`` handles that read a file only when asked. Every file is written
in a local staging folder first and then published whole (renamed on a local disk, uploaded
otherwise), so a failed step never leaves half a file; each is also logged as an artifact of the
source MLflow run under ``z0inf/<asset>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Optional

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from upath import UPath

from ..influence.analysis import GramProvenance, gram_to_frame, read_gram_file
from ..influence.atomic import atomic_output
from ..errors import InputError
from ..influence.loss_tables import ID_COLUMN, LossTable, read_loss_table, step_column
from ..review import RunLayout, read_review_queue, write_review_queue
from ..review.layout import outputs_base
from .provenance import SOURCE_ATTR
from .resources import MlflowResource

_CHUNK = 1 << 20


def _is_local(path: UPath) -> bool:
    return isinstance(path, Path)


@contextlib.contextmanager
def local_copy(path: UPath) -> Iterator[Path]:
    """A local file with the content of ``path``, for the pure readers that take a file name."""
    if _is_local(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="z0inf-read-") as tmp:
        local = Path(tmp) / path.name
        with path.open("rb") as source, local.open("wb") as target:
            shutil.copyfileobj(source, target, _CHUNK)
        yield local


@dataclass(frozen=True)
class StoredTable:
    """A parquet file among a run's outputs, read only when asked (large tables are not passed around whole)."""

    path: UPath

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        with self.path.open("rb") as handle:
            return pd.read_parquet(handle, columns=columns)

    @property
    def columns(self) -> list[str]:
        with self.path.open("rb") as handle:
            return pq.read_schema(handle).names


def _loss_table(source: LossTable | StoredTable) -> LossTable:
    if isinstance(source, LossTable):
        return source
    with local_copy(source.path) as path:
        return read_loss_table(path)


def _ids(source: LossTable | StoredTable) -> np.ndarray:
    if isinstance(source, LossTable):
        return np.asarray(source.example_ids, dtype=np.int64)
    return source.read([ID_COLUMN])[ID_COLUMN].to_numpy(np.int64)


@dataclass(frozen=True)
class LossTables:
    """The run's train and test loss tables and the last checkpoint's predictions (None: the run's data
    could not be rebuilt). In memory when just computed; file handles when loaded from storage."""

    train: LossTable | StoredTable
    test: LossTable | StoredTable
    predictions: pd.DataFrame | StoredTable | None = None

    def train_table(self) -> LossTable:
        return _loss_table(self.train)

    def test_table(self) -> LossTable:
        return _loss_table(self.test)

    def train_ids(self) -> np.ndarray:
        return _ids(self.train)

    def test_ids(self) -> np.ndarray:
        return _ids(self.test)

    def frame(self, split: str) -> pd.DataFrame:
        """A split's table as a frame: ``example_id`` then one ``step_<s>`` column per checkpoint."""
        table = {"train": self.train, "test": self.test}[split]
        if isinstance(table, StoredTable):
            return table.read()
        values = table.values.numpy()
        columns = {step_column(s): values[t] for t, s in enumerate(table.steps)}
        return pd.DataFrame({ID_COLUMN: np.asarray(table.example_ids, dtype=np.int64), **columns})

    def prediction_frame(self) -> pd.DataFrame | None:
        return self.predictions.read() if isinstance(self.predictions, StoredTable) else self.predictions

    def write_into(self, files: dict[str, Path]) -> None:
        self.train_table().write(files["train_losses"])
        self.test_table().write(files["test_losses"])
        predictions = self.prediction_frame()
        if predictions is not None:
            predictions.to_parquet(files["predictions"], index=False)

    @classmethod
    def load(cls, files: dict[str, UPath]) -> "LossTables":
        predictions = files["predictions"]
        return cls(
            StoredTable(files["train_losses"]),
            StoredTable(files["test_losses"]),
            StoredTable(predictions) if predictions.exists() else None,
        )


@dataclass(frozen=True)
class Gram:
    """G = W W^T over the checkpoints (T x T, float64), the checkpoint steps it was computed for, and
    what it was computed from (parameters, centring, checkpoint fingerprints), checked when it is reused."""

    steps: tuple[int, ...]
    matrix: torch.Tensor
    provenance: GramProvenance | None = None

    def write_into(self, files: dict[str, Path]) -> None:
        gram_to_frame(self.steps, self.matrix, self.provenance).to_parquet(files["gram"], index=False)

    @classmethod
    def load(cls, files: dict[str, UPath]) -> "Gram":
        with local_copy(files["gram"]) as path:
            return cls(*read_gram_file(path))


@dataclass(frozen=True)
class ReviewQueue:
    """The flagged examples with what a reviewer needs, ``info`` (policy, cut-off, training-set size),
    the pictures (the flag score's histogram and, for image data, a grid of the flagged images) and the
    files people open from MLflow, which previews HTML and CSV but not parquet: the review sheet and
    the queue as a readable table."""

    queue: pd.DataFrame
    info: dict
    histogram: bytes | None = None
    flagged_grid: bytes | None = None
    review_sheet: bytes | None = None
    review_table_csv: bytes | None = None
    review_table_html: bytes | None = None

    _ATTACHMENTS = ("histogram", "flagged_grid", "review_sheet", "review_table_csv", "review_table_html")

    def write_into(self, files: dict[str, Path]) -> None:
        write_review_queue(self.queue, files["review_queue"], self.info)
        for name in self._ATTACHMENTS:
            if getattr(self, name) is not None:
                files[name].write_bytes(getattr(self, name))

    @classmethod
    def load(cls, files: dict[str, UPath]) -> "ReviewQueue":
        with local_copy(files["review_queue"]) as path:
            queue, info = read_review_queue(path)
        attached = {n: files[n].read_bytes() for n in cls._ATTACHMENTS if files[n].exists()}
        return cls(queue, info, **attached)


@dataclass(frozen=True)
class LossShard:
    """Examples ``[start, stop)`` of one split, in the order the run's data is rebuilt in (``source``
    recomputed), or a whole logged table (``source`` logged, ``stop`` -1): one step's share of the loss tables."""

    split: str
    start: int
    stop: int
    source: str
    loss: str

    @property
    def key(self) -> str:
        """The shard's name in step keys (``loss_tables.compute_loss_shard[train_0]``)."""
        return f"{self.split}_{self.start}"

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__))

    @classmethod
    def read(cls, path: UPath) -> "LossShard":
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True)
class ShardLosses:
    """One shard's loss table and, when recomputed, the last checkpoint's predictions of its examples."""

    shard: LossShard
    table: LossTable
    predictions: pd.DataFrame | None = None

    def write_into(self, folder: Path) -> None:
        self.shard.write(folder / "shard.json")
        self.table.write(folder / "losses.parquet")
        if self.predictions is not None:
            self.predictions.to_parquet(folder / "predictions.parquet", index=False)


@dataclass(frozen=True)
class StoredShardLosses:
    """A stored shard, read only when asked: the assembling step holds one shard at a time."""

    shard: LossShard
    folder: UPath

    @property
    def table(self) -> LossTable:
        """Read from the file on each access (as ``ShardLosses.table``, without keeping it)."""
        return _loss_table(StoredTable(self.folder / "losses.parquet"))

    @property
    def predictions(self) -> pd.DataFrame | None:
        path = self.folder / "predictions.parquet"
        return StoredTable(path).read() if path.exists() else None


@dataclass(frozen=True)
class ProjectionShard:
    """Examples ``[start, stop)`` of one split, in the loss tables' order: one step's share of the
    random-direction projections of train-test influence, with what every step computes them with (the
    perturbed parameters and the train-test settings), so that all shards compute alike."""

    split: str
    start: int
    stop: int
    parameters: tuple[str, ...]
    train_test: dict

    FILE: ClassVar[str] = "projection_shard.json"

    @property
    def key(self) -> str:
        """The shard's name in step keys (``train_test_influence.compute_projection_shard[train_0]``)."""
        return f"{self.split}_{self.start}"

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({**self.__dict__, "parameters": list(self.parameters)}))

    @classmethod
    def read(cls, path: UPath) -> "ProjectionShard":
        raw = json.loads(path.read_text())
        return cls(**{**raw, "parameters": tuple(raw["parameters"])})


@dataclass(frozen=True)
class ShardProjections:
    """One shard's rows of the random-direction factors: (examples, checkpoints x directions), float64."""

    shard: ProjectionShard
    projections: torch.Tensor

    def write_into(self, folder: Path) -> None:
        self.shard.write(folder / ProjectionShard.FILE)
        save_file({"projections": self.projections.contiguous()}, folder / "projections.safetensors")


@dataclass(frozen=True)
class StoredShardProjections:
    """A stored shard of projections, read only when asked: the top-k step holds one shard at a time."""

    shard: ProjectionShard
    folder: UPath

    @property
    def projections(self) -> torch.Tensor:
        """Read from the file on each access (as ``ShardProjections.projections``, without keeping it)."""
        with local_copy(self.folder / "projections.safetensors") as path:
            return load_file(path)["projections"]


class LossShardsIOManager(dg.ConfigurableIOManager):
    """The shards between the steps of one Dagster run (of the loss tables and of train-test influence's
    projections): under ``<outputs>/shards/<Dagster run id>/<step>/<output>[/<shard>]``, on the same file
    system as the run outputs, so that workers on other machines read what their peers wrote. Shard plans
    are JSON, shard losses parquet, projections safetensors (nothing is pickled); computed shards come back
    as ``StoredShardLosses`` and ``StoredShardProjections`` handles."""

    base_url: Optional[str] = Field(default=None, description="folder or fsspec URL (unset: as run_outputs)")

    def _folder(self, run_id: str, step_key: str, name: str, mapping_key: str | None) -> UPath:
        folder = outputs_base(self.base_url) / "shards" / run_id / step_key / name
        return folder / mapping_key if mapping_key else folder

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        target = self._folder(context.run_id, context.step_key, context.name, context.mapping_key)
        with tempfile.TemporaryDirectory(prefix="z0inf-shard-") as tmp:
            if isinstance(obj, LossShard):
                obj.write(Path(tmp) / "shard.json")
            elif isinstance(obj, ProjectionShard):
                obj.write(Path(tmp) / ProjectionShard.FILE)
            else:
                obj.write_into(Path(tmp))
            for staged in sorted(Path(tmp).iterdir()):
                _publish(staged, target / staged.name)

    def load_input(self, context: dg.InputContext):
        upstream = context.upstream_output
        folder = self._folder(upstream.run_id, upstream.step_key, upstream.name, upstream.mapping_key)
        if (folder / ProjectionShard.FILE).exists():
            plan = ProjectionShard.read(folder / ProjectionShard.FILE)
            return StoredShardProjections(plan, folder) if (folder / "projections.safetensors").exists() else plan
        shard = LossShard.read(folder / "shard.json")
        return StoredShardLosses(shard, folder) if (folder / "losses.parquet").exists() else shard


# Outputs that are not a single frame; every other asset stores one DataFrame in its one file.
_STRUCTURED = {"loss_tables": LossTables, "weight_gram": Gram, "review_queue": ReviewQueue}
# The RunLayout properties each asset's output is stored in, first the asset's main file.
ASSET_FILES: dict[str, tuple[str, ...]] = {
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


def asset_files(layout: RunLayout, asset: str) -> dict[str, UPath]:
    """The files an asset's output is stored in, by RunLayout property name."""
    if asset not in ASSET_FILES:
        raise InputError(f"asset {asset!r}: has no files in a run's outputs (known: {sorted(ASSET_FILES)})")
    return {name: getattr(layout, name) for name in ASSET_FILES[asset]}


def _publish(source: Path, target: UPath) -> None:
    """Put a finished local file at ``target`` whole: renamed into place locally, uploaded otherwise."""
    if _is_local(target):
        with atomic_output(target) as tmp:
            shutil.copyfile(source, tmp)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class RunOutputsIOManager(dg.ConfigurableIOManager):
    """Stores each asset's output in its MLflow run's folder (``RunLayout``): parquet for tables, PNG
    for pictures. ``base_url`` unset: ``$Z0INF_OUTPUTS_URL``, else the data directory (``outputs_base``).
    A deployment may set it with ``dg.EnvVar``; assets that read other runs' outputs take this resource
    (``ResourceParam``) and ask it for ``outputs_base``, so Dagster config alone moves every path."""

    base_url: Optional[str] = Field(
        default=None, description="folder or fsspec URL holding runs/<run id>/ (e.g. s3://bucket/z0inf, memory://z0inf)"
    )
    log_to_mlflow: bool = Field(default=True, description="also log each file to the source MLflow run")
    mlflow: MlflowResource

    def outputs_base(self) -> UPath:
        return outputs_base(self.base_url)

    def layout(self, run_id: str) -> RunLayout:
        return RunLayout.for_run(run_id, self.outputs_base())

    def mark_attempt(self, asset: str, run_id: str, dagster_run_id: str) -> None:
        """Record that a materialisation of ``asset`` started (only ``review_queue`` has an attempt file):
        until ``handle_output`` publishes its output and removes the record, readers know the stored
        output is not the latest attempt's (it failed, or is still running)."""
        marker = getattr(self.layout(run_id), f"{asset}_attempt")
        with tempfile.TemporaryDirectory(prefix="z0inf-stage-") as tmp:
            staged = Path(tmp) / marker.name
            staged.write_text(json.dumps({"asset": asset, "dagster_run_id": dagster_run_id}))
            _publish(staged, marker)

    def _files(self, context) -> tuple[str, str, dict[str, UPath]]:
        asset = context.asset_key.to_user_string()
        run_id = context.asset_partition_key
        return asset, run_id, asset_files(self.layout(run_id), asset)

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        asset, run_id, files = self._files(context)
        with tempfile.TemporaryDirectory(prefix="z0inf-stage-") as tmp:
            staged = {name: Path(tmp) / name / path.name for name, path in files.items()}
            for path in staged.values():
                path.parent.mkdir()
            if isinstance(obj, pd.DataFrame):
                obj.to_parquet(next(iter(staged.values())), index=False)
            else:
                obj.write_into(staged)
            written = {name: path for name, path in staged.items() if path.exists()}
            for name, target in files.items():
                if name in written:
                    _publish(written[name], target)
                else:  # an optional file this materialisation has none of (no predictions, no image grid)
                    target.unlink(missing_ok=True)
            attempt = getattr(self.layout(run_id), f"{asset}_attempt", None)
            if attempt is not None:  # published whole: what is stored is this attempt's
                attempt.unlink(missing_ok=True)
            if self.log_to_mlflow:
                self.mlflow.log_artifacts(run_id, f"z0inf/{asset}", list(written.values()))
            # names only: the folder is one entry of its own (full paths in a table overflow the UI's column)
            rows = [f"| `{files[n].name}` | {p.stat().st_size:,} | `{sha256_of(p)[:16]}` |" for n, p in written.items()]
        context.add_output_metadata(
            {
                "stored_in": dg.MetadataValue.path(str(self.layout(run_id).root)),
                "stored_files": dg.MetadataValue.md("| file | bytes | sha256 |\n|---|---|---|\n" + "\n".join(rows)),
                "logged_to_mlflow": f"z0inf/{asset}/" if self.log_to_mlflow else "no",
            }
        )

    def load_input(self, context: dg.InputContext):
        asset, run_id, files = self._files(context)
        main = next(iter(files.values()))
        if not main.exists():
            raise dg.Failure(f"{asset} of run {run_id}: {main} does not exist; materialise {asset} first")
        if asset in _STRUCTURED:
            return _STRUCTURED[asset].load(files)
        frame = StoredTable(main).read()
        frame.attrs[SOURCE_ATTR] = str(main)
        return frame


def outputs_base_of(io_manager) -> UPath:
    """The outputs base of the ``run_outputs`` resource, for assets and checks that name a run's folder
    (ancestors' queues, GX results). An IO manager standing in for it (a test materialising to memory)
    keeps nothing in a folder, so its runs get the default base."""
    return io_manager.outputs_base() if isinstance(io_manager, RunOutputsIOManager) else outputs_base()
