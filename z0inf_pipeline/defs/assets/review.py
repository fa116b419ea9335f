"""Stage 6: flagged samples and the review queue, with the figures a reviewer looks at in the UI.

The policy counts how many examples look mislabelled and turns that into a cut-off on the flag score;
the GX suite ``flagging`` (``gx/expectations/flagging.json``) applies it, and its unexpected rows are
the queue (a data team can fix the cut-off or the share there)."""

from dataclasses import replace

import dagster as dg
import numpy as np
import pandas as pd

from ...errors import InputError
from ...quality import validate_flagging
from ...review import RunLayout, build_review_queue, detection_quality, flag_scores, read_review_queue
from ...review.gate import POLICY_CHANGES_KEY, policy_changes
from ...review.artifacts import SHEET_NAME, TABLE_STEM, review_artifacts, reviewer_table
from ...review.run_review import RUN_NAME_KEY, RunReview
from ...review.figures import histogram_png, image_grid_png, markdown_image
from ...review.lineage import CALIBRATED_ON_KEY, LINEAGE_INFO_KEY, inherited_cutoff, lineage_decisions
from ...review.policy import FlagPolicy, given_labels
from ...tracking import run_lineage
from ...training import TrainConfig, load_dataset
from ..config import FlagPolicyConfig
from ..metadata import gx_metadata, rounded, run_id_of, table_metadata
from ..partitions import PER_RUN
from ..provenance import verify_scores
from ..resources import DecisionStoreResource, MlflowResource
from ..storage import LossTables, ReviewQueue, RunOutputsIOManager, outputs_base_of

GRID_IMAGES = 40
PREVIEW_ROWS = 25


@dg.asset(**PER_RUN, kinds={"parquet"})
def review_queue(
    context: dg.AssetExecutionContext,
    config: FlagPolicyConfig,
    self_influence: pd.DataFrame,
    training_run: pd.DataFrame,
    loss_tables: LossTables,
    train_test_influence: pd.DataFrame,
    mlflow: MlflowResource,
    decisions: DecisionStoreResource,
    run_outputs: dg.ResourceParam[RunOutputsIOManager],
) -> dg.Output[ReviewQueue]:
    """Training examples flagged by the policy (a flag score, a cut-off, a review budget), highest first,
    each with every signal and its rank, label, prediction and loss trajectory; the test examples each
    one helps and hurts most go into the review sheet. Built only from the scores that passed
    ``self_influence_is_valid``. Decisions live in the review store (``z0inf review decide``), which
    re-materialising never touches."""
    run_id = run_id_of(context)
    if isinstance(run_outputs, RunOutputsIOManager):  # until this attempt's queue is stored, the old one is out of date
        run_outputs.mark_attempt("review_queue", run_id, context.run_id)
    base = outputs_base_of(run_outputs)  # where the ancestors' queues are, as Dagster config set it
    policy = config.settings(FlagPolicy)
    layout = RunLayout.for_run(run_id, base)  # names the run; every output the sheet shows is passed in
    changes = policy_changes(
        run_id, _built_before(layout), policy.to_dict(), changed_by=config.policy_changed_by,
        retraining=context.job_name != "influence_job",  # retrain_job, pipeline_job: they hold the retrain
    )
    train = training_run[training_run["split"] == "train"]
    verify_scores(context.instance, run_id, self_influence, train["example_id"].to_numpy(np.int64))
    lineage = {LINEAGE_INFO_KEY: run_lineage(run_id, mlflow.client())}
    store = decisions.open()
    current = lineage_decisions(store, run_id, lineage)
    inherited = inherited_cutoff(lineage[LINEAGE_INFO_KEY], policy, base)
    # Loaded from storage these read a parquet file each time: read once, shared by the count, the queue and the sheet.
    train_losses, predictions = loss_tables.frame("train"), loss_tables.prediction_frame()
    flags = flag_scores(self_influence, policy, labels=given_labels(train, self_influence),
                        loss_tables=(train_losses, loss_tables.frame("test")),
                        inherited_cutoff=None if inherited is None else inherited[0])
    flagging = validate_flagging(self_influence["example_id"], flags.score, flags.cutoff,
                                 policy.max_unreviewed_fraction, folder=RunLayout.for_run(run_id, base).gx_folder)
    policy_cutoff = flags.cutoff
    flags = replace(flags, flagged=np.isin(self_influence["example_id"], flagging.flagged_ids), cutoff=flagging.cutoff)
    queue = build_review_queue(self_influence, flags, train, train_losses, predictions, current)
    run = mlflow.fetch(run_id)
    num_classes = run.model_spec.get("num_classes") or run.params.get("num_classes")
    info = {
        "run_id": run_id,
        RUN_NAME_KEY: run.tags.get("mlflow.runName") or run_id[:8],
        "policy": policy.to_dict(),
        "cutoff": flags.cutoff,
        "flagging": {
            "suite": "flagging",
            "expectation": "expect_column_values_to_be_between(flag_score, max_value=cutoff, strict_max=True)",
            "cutoff": flags.cutoff,
            "policy_cutoff": policy_cutoff,
            "counted_by": flags.counted_by,
            "mostly": flagging.mostly,
            "flagged": flags.count,
            "success": flagging.report.success,
            "validation_result": str(flagging.report.validation_result),
            "data_docs": str(flagging.report.data_docs_page),
        },
        "training_examples": len(train),
        "num_classes": None if num_classes is None else int(num_classes),
        **lineage,
        CALIBRATED_ON_KEY: run_id if inherited is None else inherited[1],
        POLICY_CHANGES_KEY: changes,
    }
    histogram = histogram_png(
        flags.score, flags.cutoff, f"run {run_id[:8]}: {policy.describe()}", flagged=flags.count,
        axis_label=f"flag score ({policy.score})",
    )
    grid = _flagged_grid(run, queue.head(GRID_IMAGES))
    frames = {
        "examples": training_run,
        "predictions": predictions,
        "train_losses": train_losses,
        "test_losses": loss_tables.frame("test"),
        "self_influence": self_influence,
        "topk": train_test_influence,
    }
    review = RunReview(layout, queue, info, run.train_config, frames)
    readable = review_artifacts(review, store, histogram, current)
    metadata: dict = {
        **mlflow.run_metadata(run_id),
        "flagged": flags.count,
        "flagged_fraction": rounded(flags.fraction),
        "cutoff": rounded(flags.cutoff),
        "policy": dg.MetadataValue.json(policy.to_dict()),
        "policy_changes": dg.MetadataValue.json(changes),
        **gx_metadata(mlflow, run_id, RunLayout.for_run(run_id, base).gx_folder, flagging.report),
        "unreviewed": int(queue["decision"].isna().sum()),
        "review_queue": table_metadata(reviewer_table(review, current), PREVIEW_ROWS),
        "flag_score_histogram": dg.MetadataValue.md(markdown_image(histogram, f"histogram of the flag score ({policy.score})")),
        "dagster/row_count": len(queue),
    }
    metrics = {
        "z0inf.flagged_count": flags.count,
        "z0inf.flagged_fraction": flags.fraction,
        "z0inf.flag_cutoff": flags.cutoff,
    }
    # the `flipped` column marks what was corrupted on purpose: a label, or (text runs) an answer;
    # without any (a real run, or a retrained one whose injected errors were all removed) nothing is printed
    injected = "wrong_answers" if review.is_text else "flips"
    quality = detection_quality(queue["example_id"], train.loc[train["flipped"], "example_id"])
    if quality is not None:
        metadata.update(
            {
                f"precision_vs_injected_{injected}": rounded(quality["precision"]),
                f"recall_vs_injected_{injected}": rounded(quality["recall"]),
            }
        )
        metrics.update({"z0inf.flag_precision": quality["precision"], "z0inf.flag_recall": quality["recall"]})
    if grid is not None:
        metadata["flagged_examples"] = dg.MetadataValue.md(markdown_image(grid, "flagged training examples"))
    mlflow.log_metrics(run_id, metrics)
    context.log.info(
        f"{flags.count} of {len(train)} training examples flagged ({policy.describe()})"
        + (
            ""
            if quality is None
            else f"; precision {quality['precision']:.3g}, recall {quality['recall']:.3g} "
            f"against the {int(quality['flipped'])} injected {'wrong answers' if review.is_text else 'label flips'} "
            "still in its training set"
        )
    )
    previews = {
        "review_sheet": readable[SHEET_NAME],
        "review_table_csv": readable[f"{TABLE_STEM}.csv"],
        "review_table_html": readable[f"{TABLE_STEM}.html"],
    }
    return dg.Output(ReviewQueue(queue, info, histogram, grid, **previews), metadata=metadata)


def _built_before(layout: RunLayout) -> dict | None:
    """The info of the run's queue built before, whose policy binds this build; None for the first."""
    if not layout.review_queue.exists():
        return None
    return read_review_queue(layout.review_queue)[1]


def _flagged_grid(run, flagged: pd.DataFrame) -> bytes | None:
    """A grid of the flagged images with label and predicted label; None for data that are not images."""
    if run.train_config is None or flagged.empty:
        return None
    try:
        config = TrainConfig.from_dict(run.train_config)
        bundle = load_dataset(
            config.dataset,
            seed=config.seed,
            test_fraction=config.test_fraction,
            label_column=config.label_column,
            image=True,
        )
    except InputError:
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
