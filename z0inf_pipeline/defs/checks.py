"""Asset checks, one evaluation per MLflow run: thin wrappers that run the GX suites of
``z0inf_pipeline.quality`` (the repository's ``gx/`` project) and the review gate on the value they check.
Each GX validation is stored in the run's ``gx/`` folder, whose Data Docs the check's metadata links to
and which is logged to the MLflow run under ``gx/``.

Every check that guards a later stage is blocking: when it fails, the assets downstream of its
asset are not materialised in that run. The review gate sits on ``review_queue`` and runs in the
same run as ``curated_training_set`` and ``retrained_run`` (``retrain_job``), so it stops retraining.
"""

import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from ..influence.analysis import InfluenceArguments
from ..quality import SuiteReport, validate_curated_set, validate_loss_table, validate_self_influence, validate_topk
from ..review import RunLayout, lineage_decisions
from ..review.gate import queue_gate
from ..review.curation import relabels_of, target_edits_of
from .assets import (
    curated_training_set,
    loss_tables,
    model_promotion,
    retrained_run,
    review_queue,
    self_influence,
    train_test_influence,
    weight_gram,
)
from ..review.lineage import DECISIONS_THROUGH
from .assets.retraining import curated_from_frame, decisions_through
from .metadata import file_link, gx_metadata, rounded, run_id_of, split_ids
from .partitions import mlflow_runs
from .provenance import HASH_KEY, content_hash
from .resources import DecisionStoreResource, MlflowResource
from .storage import Gram, LossTables, ReviewQueue, RunOutputsIOManager, outputs_base_of

# Partitioned checks are a preview feature of dagster 1.13; this project relies on it knowingly.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)

EXAMPLES = {"training_run": dg.AssetIn("training_run")}
LOSS_TABLES = {"loss_tables": dg.AssetIn("loss_tables")}


def _result(mlflow: MlflowResource, run_id: str, folder: Path, *reports: SuiteReport, **extra) -> dg.AssetCheckResult:
    passed = all(r.success for r in reports)
    metadata = {
        **mlflow.run_metadata(run_id),
        "expectations": sum(r.evaluated for r in reports),
        "failed_expectations": sum(len(r.failures) for r in reports),
        "report": dg.MetadataValue.md("\n\n".join(f"```\n{r.summary()}\n```" for r in reports)),
        **gx_metadata(mlflow, run_id, folder, *reports),
        **extra,
    }
    summary = "; ".join(r.summary().splitlines()[0] for r in reports)
    return dg.AssetCheckResult(passed=passed, metadata=metadata, description=summary)


@dg.asset_check(asset=loss_tables, blocking=True, partitions_def=mlflow_runs, additional_ins=EXAMPLES)
def loss_tables_are_valid(
    context: dg.AssetCheckExecutionContext,
    loss_tables: LossTables,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    run_outputs: dg.ResourceParam[RunOutputsIOManager],
) -> dg.AssetCheckResult:
    """GX: one column per checkpoint in step order, no NaN/inf, losses >= 0 (runs trained by this project
    use cross-entropy or 0-1 loss; for other runs only finiteness is required), one row per example of
    the split, unique ids."""
    run = mlflow.fetch(run_id_of(context))
    nonnegative = run.train_config is not None
    folder = RunLayout.for_run(run.run_id, outputs_base_of(run_outputs)).gx_folder
    reports = []
    for split in ("train", "test"):
        ids = split_ids(training_run, split)
        reports.append(
            validate_loss_table(
                loss_tables.frame(split),
                run.steps,
                len(ids),
                name=f"{split}_loss_table",
                nonnegative=nonnegative,
                expected_ids=ids,
                folder=folder,
            )
        )
    return _result(mlflow, run.run_id, folder, *reports, nonnegative_required=nonnegative)


@dg.asset_check(asset=weight_gram, blocking=True, partitions_def=mlflow_runs)
def gram_is_valid(
    context: dg.AssetCheckExecutionContext, weight_gram: Gram, mlflow: MlflowResource
) -> dg.AssetCheckResult:
    """The Gram matrix is finite, symmetric and has a non-negative diagonal (squared norms)."""
    g = weight_gram.matrix.numpy()
    finite = bool(np.isfinite(g).all())
    asymmetry = float(np.abs(g - g.T).max()) if finite else float("inf")
    scale = float(np.abs(g).max()) if finite else 1.0
    symmetric = asymmetry <= 1e-9 * max(scale, 1e-300)
    diagonal_ok = bool((np.diag(g) >= 0).all())
    passed = finite and symmetric and diagonal_ok
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            **mlflow.run_metadata(run_id_of(context)),
            "checkpoints": len(weight_gram.steps),
            "finite": finite,
            "max_asymmetry": rounded(asymmetry),
            "diagonal_nonnegative": diagonal_ok,
        },
        description=f"Gram matrix over {len(weight_gram.steps)} checkpoints is {'' if passed else 'not '}"
        "finite and symmetric with a non-negative diagonal",
    )


@dg.asset_check(asset=self_influence, blocking=True, partitions_def=mlflow_runs, additional_ins=LOSS_TABLES)
def self_influence_is_valid(
    context: dg.AssetCheckExecutionContext,
    self_influence: pd.DataFrame,
    loss_tables: LossTables,
    mlflow: MlflowResource,
    run_outputs: dg.ResourceParam[RunOutputsIOManager],
) -> dg.AssetCheckResult:
    """GX: scores finite, self-influence >= 0, example ids exactly those of the training loss table.
    Records the content hash of the scores it passed: the review queue is only rebuilt from those."""
    run_id = run_id_of(context)
    folder = RunLayout.for_run(run_id, outputs_base_of(run_outputs)).gx_folder
    report = validate_self_influence(self_influence, loss_tables.train_ids(), folder=folder)
    return _result(mlflow, run_id, folder, report, **{HASH_KEY: content_hash(self_influence)})


@dg.asset_check(asset=train_test_influence, blocking=True, partitions_def=mlflow_runs, additional_ins=LOSS_TABLES)
def train_test_influence_is_valid(
    context: dg.AssetCheckExecutionContext,
    train_test_influence: pd.DataFrame,
    loss_tables: LossTables,
    mlflow: MlflowResource,
    run_outputs: dg.ResourceParam[RunOutputsIOManager],
) -> dg.AssetCheckResult:
    """GX: k finite rows per test example (k as configured for the materialisation, at most the number of
    training examples), every id from the loss tables, proponents >= opponents."""
    run_id = run_id_of(context)
    train_ids = loss_tables.train_ids()
    k = min(_configured_topk(context, run_id), len(train_ids))
    folder = RunLayout.for_run(run_id, outputs_base_of(run_outputs)).gx_folder
    report = validate_topk(train_test_influence, train_ids, loss_tables.test_ids(), k, folder=folder)
    return _result(mlflow, run_id, folder, report, k=k)


def _configured_topk(context: dg.AssetCheckExecutionContext, run_id: str) -> int:
    """The ``topk`` the checked materialisation was configured with (its ``estimator`` metadata)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=train_test_influence.key, asset_partitions=[run_id]), limit=1
    ).records
    if not records:
        raise dg.Failure(f"train_test_influence of run {run_id}: has never been materialised")
    return InfluenceArguments(**records[0].asset_materialization.metadata["estimator"].value).topk


# Not blocking: a shut gate is the expected state while a review is under way, not a failed run.
# curated_training_set evaluates the same gate and yields nothing while it is shut, so the retrain's
# steps are skipped and the run ends successful, with this check's message saying why.
@dg.asset_check(asset=review_queue, blocking=False, partitions_def=mlflow_runs)
def review_gate(
    context: dg.AssetCheckExecutionContext,
    review_queue: ReviewQueue,
    mlflow: MlflowResource,
    decisions: DecisionStoreResource,
) -> dg.AssetCheckResult:
    """Retraining waits for review: fails while the flagged examples without a decision exceed the
    policy's ``max_unreviewed_fraction`` of the training set. Decisions: ``z0inf review decide``."""
    run_id = run_id_of(context)
    queue, info = review_queue.queue, review_queue.info
    current = lineage_decisions(decisions.open(), run_id, info)
    status = queue_gate(queue, info, current)
    metadata = {
        **mlflow.run_metadata(run_id),
        "flagged": status.flagged,
        "reviewed": status.reviewed,
        "unreviewed": status.unreviewed,
        "unreviewed_fraction": rounded(status.unreviewed_fraction),
        "max_unreviewed_fraction": rounded(status.max_unreviewed_fraction),
    }
    if "flagging" in info:  # the GX validation whose unexpected rows are the queue
        metadata["flagging_cutoff"] = rounded(info["flagging"]["cutoff"])
        metadata["data_docs_flagging"] = dg.MetadataValue.md(file_link(Path(info["flagging"]["data_docs"])))
    if not status.passed:
        shown = " ".join(str(i) for i in status.unreviewed_ids[:10])
        metadata["how_to_review"] = dg.MetadataValue.md(
            f"`z0inf review list --run {run_id}` shows the queue; decide with e.g.\n\n"
            f"`z0inf review decide {run_id} {shown} --action drop` (or `keep`; `relabel --label Y` on a "
            "classification run, `edit_target --target TEXT` on a text run)"
        )
    context.log.info(status.message())
    return dg.AssetCheckResult(passed=status.passed, metadata=metadata, description=status.message())


@dg.asset_check(
    asset=curated_training_set,
    blocking=True,
    partitions_def=mlflow_runs,
    additional_ins={**EXAMPLES, "review_queue": dg.AssetIn("review_queue")},
)
def curated_set_matches_decisions(
    context: dg.AssetCheckExecutionContext,
    curated_training_set: pd.DataFrame,
    training_run: pd.DataFrame,
    review_queue: ReviewQueue,
    mlflow: MlflowResource,
    decisions: DecisionStoreResource,
    run_outputs: dg.ResourceParam[RunOutputsIOManager],
) -> dg.AssetCheckResult:
    """GX: the curated set holds every training example not dropped, none dropped, each relabel and
    target edit applied,
    for the lineage's decisions in force up to the high-water mark the curated set records (read from
    the store again, not from the curation). Decisions recorded after it are counted as pending: they
    take effect at the next retrain."""
    run_id = run_id_of(context)
    train_ids = split_ids(training_run)
    through = decisions_through(curated_training_set)
    store = decisions.open()
    current = lineage_decisions(store, run_id, review_queue.info, through=through)
    current = current[current["example_id"].isin(train_ids)]  # an ancestor's drop applied before: already out
    dropped = current.loc[current["action"] == "drop", "example_id"].tolist()
    folder = RunLayout.for_run(run_id, outputs_base_of(run_outputs)).gx_folder
    report = validate_curated_set(curated_training_set, train_ids, dropped, relabels_of(current),
                                  target_edits_of(current), folder=folder)
    pending = int((lineage_decisions(store, run_id, review_queue.info)["sequence"] > through).sum())
    return _result(mlflow, run_id, folder, report, **{DECISIONS_THROUGH: through, "pending_for_next_retrain": pending})


@dg.asset_check(
    asset=retrained_run,
    partitions_def=mlflow_runs,
    additional_ins={**EXAMPLES, "curated_training_set": dg.AssetIn("curated_training_set")},
)
def retrained_run_follows_curation(
    context: dg.AssetCheckExecutionContext,
    retrained_run: pd.DataFrame,
    curated_training_set: pd.DataFrame,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    run_outputs: dg.ResourceParam[RunOutputsIOManager],
) -> dg.AssetCheckResult:
    """GX on the retrained MLflow run's own examples table: it trained on exactly the curated set
    (dropped ids absent, relabels and edited target texts carried) and is tagged with its parent run."""
    run_id = run_id_of(context)
    child_id = str(retrained_run.at[0, "retrained_run_id"])
    child = mlflow.fetch(child_id)
    child_examples = pd.read_parquet(child.examples)
    trained = child_examples[child_examples["split"] == "train"]
    trained = trained[["example_id", "label", *(["target"] if "target" in trained else [])]]
    curated = curated_from_frame(curated_training_set, training_run)
    report = validate_curated_set(
        trained.rename(columns={"target": "target_text"}), split_ids(training_run), curated.dropped_ids,
        curated.relabels, curated.target_edits, name="retrained_training_set",
        folder=RunLayout.for_run(run_id, outputs_base_of(run_outputs)).gx_folder,
    )
    parent_tag = child.tags.get("z0inf.parent_run_id")
    result = _result(mlflow, run_id, RunLayout.for_run(run_id, outputs_base_of(run_outputs)).gx_folder, report, **mlflow.run_metadata(child_id, prefix="retrained_run"))
    if parent_tag != run_id:
        return dg.AssetCheckResult(
            passed=False,
            metadata=result.metadata,
            description=f"retrained run {child_id} is tagged with parent {parent_tag!r}",
        )
    return result


@dg.asset_check(asset=model_promotion, partitions_def=mlflow_runs)
def retrained_model_is_champion(
    context: dg.AssetCheckExecutionContext, model_promotion: pd.DataFrame, mlflow: MlflowResource
) -> dg.AssetCheckResult:
    """Not blocking: passes when the retrained model became ``champion``; otherwise it warns why (the gate,
    or the interval against the margin, or a skip) with the interval."""
    row = model_promotion.iloc[0]
    promoted = row["alias"] == "champion"
    return dg.AssetCheckResult(
        passed=bool(promoted),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            **mlflow.run_metadata(str(row["retrained_run_id"]), prefix="retrained_run"),
            "registered_model": str(row["registered_model"]),
            "version": str(row["version"]),
            "alias": str(row["alias"]) or "none (skipped)",
            "gate_passed": bool(row["gate_passed"]),
            "interval": f"[{rounded(row['gain_low'])}, {rounded(row['gain_high'])}]",
            "margin": float(row["margin"]),
        },
        description=f"{'champion' if promoted else 'not promoted'}: {row['reason']}",
    )


ALL_CHECKS = [
    loss_tables_are_valid,
    gram_is_valid,
    self_influence_is_valid,
    train_test_influence_is_valid,
    review_gate,
    curated_set_matches_decisions,
    retrained_run_follows_curation,
    retrained_model_is_champion,
]
