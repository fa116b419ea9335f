"""Stage 6: flagged samples and the review queue, with the figures a reviewer looks at in the UI."""

import dagster as dg
import numpy as np
import pandas as pd

from ...influence.atomic import atomic_output
from ...influence.errors import InfluenceInputError
from ...review import DecisionStore, build_review_queue, detection_quality, flag_scores, write_review_queue
from ...review.figures import histogram_png, image_grid_png, markdown_image
from ...review.lineage import CALIBRATED_ON_KEY, LINEAGE_INFO_KEY, inherited_cutoff, lineage_decisions
from ...tracking import run_lineage
from ...training import TrainConfig, load_dataset
from ..config import FlagPolicyConfig
from ..metadata import layout_for, markdown_table, path_metadata
from ..partitions import mlflow_runs
from ..resources import MlflowResource
from .self_influence import self_influence
from .topk import train_test_influence

GRID_IMAGES = 40
PREVIEW_ROWS = 25


@dg.asset(
    partitions_def=mlflow_runs, group_name="z0inf", deps=[self_influence, train_test_influence], kinds={"parquet"}
)
def review_queue(
    context: dg.AssetExecutionContext, config: FlagPolicyConfig, mlflow: MlflowResource
) -> dg.MaterializeResult:
    """Training examples whose self-influence is above the flag policy's cut-off, highest first, each
    with its score, label, predicted label and loss trajectory. Decisions live in the review store
    (``z0inf review decide``), which re-materialising never touches."""
    layout = layout_for(context)
    run_id = layout.run_id
    policy = config.to_policy()
    scores = pd.read_parquet(layout.self_influence)
    examples = pd.read_parquet(layout.examples)
    train = examples[examples["split"] == "train"]
    predictions = pd.read_parquet(layout.predictions) if layout.predictions.exists() else None
    lineage = {LINEAGE_INFO_KEY: run_lineage(run_id, mlflow.client())}
    decisions = lineage_decisions(DecisionStore.open(), run_id, lineage)
    inherited = inherited_cutoff(lineage[LINEAGE_INFO_KEY], policy)
    flags = flag_scores(scores, policy, inherited_cutoff=None if inherited is None else inherited[0])
    queue = build_review_queue(scores, flags, train, pd.read_parquet(layout.train_losses), predictions, decisions)
    run = mlflow.fetch(run_id)
    num_classes = run.model_spec.get("num_classes") or run.params.get("num_classes")
    info = {
        "run_id": run_id,
        "policy": policy.to_dict(),
        "cutoff": flags.cutoff,
        "training_examples": len(train),
        "num_classes": None if num_classes is None else int(num_classes),
        **lineage,
        CALIBRATED_ON_KEY: run_id if inherited is None else inherited[1],
    }
    write_review_queue(queue, layout.review_queue, info)

    histogram = histogram_png(flags.score, flags.cutoff, f"run {run_id[:8]}: {policy.describe()}")
    _write_bytes(layout.histogram, histogram)
    metadata: dict = {
        "flagged": flags.count,
        "flagged_fraction": flags.fraction,
        "cutoff": flags.cutoff,
        "policy": dg.MetadataValue.json(policy.to_dict()),
        "unreviewed": int(queue["decision"].isna().sum()),
        "review_queue": dg.MetadataValue.md(markdown_table(_preview(queue), PREVIEW_ROWS)),
        "self_influence_histogram": dg.MetadataValue.md(markdown_image(histogram, "self-influence histogram")),
        "dagster/row_count": len(queue),
    }
    metrics = {
        "z0inf.flagged_count": flags.count,
        "z0inf.flagged_fraction": flags.fraction,
        "z0inf.flag_cutoff": flags.cutoff,
    }
    quality = detection_quality(queue["example_id"], train.loc[train["flipped"], "example_id"])
    if quality is not None:
        metadata.update(
            {"precision_vs_injected_flips": quality["precision"], "recall_vs_injected_flips": quality["recall"]}
        )
        metrics.update({"z0inf.flag_precision": quality["precision"], "z0inf.flag_recall": quality["recall"]})
    files = [layout.review_queue, layout.histogram]
    grid = _flagged_grid(run, queue.head(GRID_IMAGES))
    if grid is not None:
        _write_bytes(layout.flagged_grid, grid)
        files.append(layout.flagged_grid)
        metadata["flagged_examples"] = dg.MetadataValue.md(markdown_image(grid, "flagged training examples"))
    mlflow.log_outputs(run_id, "review_queue", files, metrics)
    context.log.info(
        f"{flags.count} of {len(train)} training examples flagged ({policy.describe()})"
        + (
            ""
            if quality is None
            else f"; precision {quality['precision']:.2f}, recall {quality['recall']:.2f} "
            "against the injected label flips"
        )
    )
    return dg.MaterializeResult(
        metadata={**metadata, **path_metadata(review_queue=layout.review_queue, histogram=layout.histogram)}
    )


def _preview(queue: pd.DataFrame) -> pd.DataFrame:
    shown = queue[
        ["rank", "example_id", "self_influence", "robust_z", "label", "predicted_label", "confidence", "decision"]
    ].copy()
    shown.insert(
        7, "loss first -> last", [f"{a:.3g} -> {b:.3g}" for a, b in zip(queue["loss_first"], queue["loss_last"])]
    )
    return shown


def _flagged_grid(run, flagged: pd.DataFrame) -> bytes | None:
    """A grid of the flagged images with label and predicted label; None for data that are not images."""
    if run.train_config is None or flagged.empty:
        return None
    config = TrainConfig.from_dict(run.train_config)
    try:
        bundle = load_dataset(
            config.dataset,
            seed=config.seed,
            test_fraction=config.test_fraction,
            label_column=config.label_column,
            image=True,
        )
    except InfluenceInputError:
        return None
    ids = flagged["example_id"].to_numpy(np.int64)
    positions = pd.Index(bundle.train.example_ids).get_indexer(ids)
    if (positions < 0).any():
        return None
    images = bundle.train.features[positions].numpy()
    images = images[:, 0] if images.ndim == 4 and images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
    captions = [
        f"#{i}\ny={y}" + ("" if pd.isna(p) else f" pred={p}")
        for i, y, p in zip(ids, flagged["label"], flagged["predicted_label"])
    ]
    return image_grid_png(images, captions)


def _write_bytes(path, payload: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(payload)
