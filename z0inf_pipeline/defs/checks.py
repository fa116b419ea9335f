"""Asset checks: thin wrappers that run the GX suites of ``z0inf_pipeline.quality`` and the review gate.

Every check that guards a later stage is blocking: when it fails, the assets downstream of its
asset are not materialised in that run. The review gate sits on ``review_queue`` and runs in the
same run as ``curated_training_set`` and ``retrained_run`` (``retrain_job``), so it stops retraining.
"""

import dagster as dg
import numpy as np
import pandas as pd

from ..influence.analysis import read_gram
from ..quality import SuiteReport, validate_curated_set, validate_loss_table, validate_self_influence, validate_topk
from ..review import DecisionStore, evaluate_gate, lineage_decisions, read_review_queue
from .assets import (
    curated_training_set,
    loss_tables,
    retrained_run,
    review_queue,
    self_influence,
    train_test_influence,
    weight_gram,
)
from .metadata import layout_for
from .resources import MlflowResource


def _result(*reports: SuiteReport, **extra) -> dg.AssetCheckResult:
    passed = all(r.success for r in reports)
    metadata = {
        "expectations": sum(r.evaluated for r in reports),
        "failed_expectations": sum(len(r.failures) for r in reports),
        "report": dg.MetadataValue.md("\n\n".join(f"```\n{r.summary()}\n```" for r in reports)),
        **extra,
    }
    summary = "; ".join(r.summary().splitlines()[0] for r in reports)
    return dg.AssetCheckResult(passed=passed, metadata=metadata, description=summary)


@dg.asset_check(asset=loss_tables, blocking=True)
def loss_tables_are_valid(context: dg.AssetCheckExecutionContext, mlflow: MlflowResource) -> dg.AssetCheckResult:
    """GX: one column per checkpoint in step order, no NaN/inf, losses >= 0 (runs trained by this project
    use cross-entropy or 0-1 loss; for other runs only finiteness is required), one row per example of
    the split, unique ids."""
    layout = layout_for(context)
    run = mlflow.fetch(layout.run_id)
    examples = pd.read_parquet(layout.examples)
    nonnegative = run.train_config is not None
    reports = []
    for split, path in (("train", layout.train_losses), ("test", layout.test_losses)):
        ids = examples.loc[examples["split"] == split, "example_id"].to_numpy(np.int64)
        reports.append(
            validate_loss_table(
                pd.read_parquet(path),
                run.steps,
                len(ids),
                name=f"{split}_loss_table",
                nonnegative=nonnegative,
                expected_ids=ids,
            )
        )
    return _result(*reports, nonnegative_required=nonnegative)


@dg.asset_check(asset=weight_gram, blocking=True)
def gram_is_valid(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The Gram matrix is finite, symmetric and has a non-negative diagonal (squared norms)."""
    steps, gram = read_gram(layout_for(context).gram)
    g = gram.numpy()
    finite = bool(np.isfinite(g).all())
    asymmetry = float(np.abs(g - g.T).max()) if finite else float("inf")
    scale = float(np.abs(g).max()) if finite else 1.0
    symmetric = asymmetry <= 1e-9 * max(scale, 1e-300)
    diagonal_ok = bool((np.diag(g) >= 0).all())
    passed = finite and symmetric and diagonal_ok
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "checkpoints": len(steps),
            "finite": finite,
            "max_asymmetry": asymmetry,
            "diagonal_nonnegative": diagonal_ok,
        },
        description=None if passed else "Gram matrix is not finite, symmetric with a non-negative diagonal",
    )


@dg.asset_check(asset=self_influence, blocking=True)
def self_influence_is_valid(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """GX: scores finite, self-influence >= 0, example ids exactly those of the training loss table."""
    layout = layout_for(context)
    loss_ids = pd.read_parquet(layout.train_losses, columns=["example_id"])["example_id"].to_numpy(np.int64)
    return _result(validate_self_influence(pd.read_parquet(layout.self_influence), loss_ids))


@dg.asset_check(asset=train_test_influence, blocking=True)
def train_test_influence_is_valid(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """GX: k finite rows per test example, every id from the loss tables, proponents >= opponents."""
    layout = layout_for(context)
    train_ids = pd.read_parquet(layout.train_losses, columns=["example_id"])["example_id"].to_numpy(np.int64)
    test_ids = pd.read_parquet(layout.test_losses, columns=["example_id"])["example_id"].to_numpy(np.int64)
    frame = pd.read_parquet(layout.topk)
    k = int(frame["rank"].max()) if len(frame) else 1
    return _result(validate_topk(frame, train_ids, test_ids, k))


@dg.asset_check(asset=review_queue, blocking=True)
def review_gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Retraining waits for review: fails while the flagged examples without a decision exceed the
    policy's ``max_unreviewed_fraction`` of the training set. Decisions: ``z0inf review decide``."""
    layout = layout_for(context)
    queue, info = read_review_queue(layout.review_queue)
    decisions = lineage_decisions(DecisionStore.open(), layout.run_id, info)
    status = evaluate_gate(
        queue["example_id"],
        decisions["example_id"],
        info["training_examples"],
        info["policy"]["max_unreviewed_fraction"],
    )
    metadata = {
        "flagged": status.flagged,
        "reviewed": status.reviewed,
        "unreviewed": status.unreviewed,
        "unreviewed_fraction": status.unreviewed_fraction,
        "max_unreviewed_fraction": status.max_unreviewed_fraction,
    }
    if not status.passed:
        shown = " ".join(str(i) for i in status.unreviewed_ids[:10])
        metadata["how_to_review"] = dg.MetadataValue.md(
            f"`z0inf review list --run {layout.run_id}` shows the queue; decide with e.g.\n\n"
            f"`z0inf review decide {layout.run_id} {shown} --action drop` (or `keep`, `relabel --label Y`)"
        )
    context.log.info(status.message())
    return dg.AssetCheckResult(passed=status.passed, metadata=metadata, description=status.message())


@dg.asset_check(asset=curated_training_set, blocking=True)
def curated_set_matches_decisions(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """GX: the curated set holds every training example not dropped, none dropped, each relabel applied."""
    layout = layout_for(context)
    examples = pd.read_parquet(layout.examples)
    train_ids = examples.loc[examples["split"] == "train", "example_id"].to_numpy(np.int64)
    decisions = DecisionStore.open().current(layout.run_id)
    dropped = decisions.loc[decisions["action"] == "drop", "example_id"].tolist()
    relabelled = decisions[decisions["action"] == "relabel"]
    relabels = {int(i): int(y) for i, y in zip(relabelled["example_id"], relabelled["label"])}
    return _result(validate_curated_set(pd.read_parquet(layout.curated_set), train_ids, dropped, relabels))


@dg.asset_check(asset=retrained_run)
def retrained_run_follows_curation(
    context: dg.AssetCheckExecutionContext, mlflow: MlflowResource
) -> dg.AssetCheckResult:
    """GX on the retrained MLflow run's own examples table: it trained on exactly the curated set
    (dropped ids absent, relabels carried) and is tagged with its parent run."""
    from .assets.retraining import curated_from_file

    layout = layout_for(context)
    summary = pd.read_parquet(layout.retrained)
    child_id = str(summary.at[0, "retrained_run_id"])
    child = mlflow.fetch(child_id)
    child_examples = pd.read_parquet(child.examples)
    trained = child_examples[child_examples["split"] == "train"][["example_id", "label"]]
    curated = curated_from_file(layout)
    examples = pd.read_parquet(layout.examples)
    train_ids = examples.loc[examples["split"] == "train", "example_id"].to_numpy(np.int64)
    report = validate_curated_set(
        trained, train_ids, curated.dropped_ids, curated.relabels, name="retrained_training_set"
    )
    parent_tag = child.tags.get("z0inf.parent_run_id")
    result = _result(report, retrained_run_id=child_id, parent_tag=str(parent_tag))
    if parent_tag != layout.run_id:
        return dg.AssetCheckResult(
            passed=False,
            metadata=result.metadata,
            description=f"retrained run {child_id} is tagged with parent {parent_tag!r}",
        )
    return result


ALL_CHECKS = [
    loss_tables_are_valid,
    gram_is_valid,
    self_influence_is_valid,
    train_test_influence_is_valid,
    review_gate,
    curated_set_matches_decisions,
    retrained_run_follows_curation,
]
