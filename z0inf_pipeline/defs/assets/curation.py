"""Stage 7: the training set as reviewed: dropped examples removed, relabels applied."""

import dagster as dg
import pandas as pd

from ...influence.analysis import write_frame
from ...review import DecisionStore, curate, read_review_queue
from ..metadata import layout_for, markdown_table, path_metadata
from ..partitions import mlflow_runs
from ..resources import MlflowResource
from .review import review_queue


@dg.asset(partitions_def=mlflow_runs, group_name="z0inf", deps=[review_queue], kinds={"parquet"})
def curated_training_set(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.MaterializeResult:
    """Every decision in force for the run (flagged or not) applied to its training examples. Runs only
    after the blocking review gate on ``review_queue`` passed in the same run."""
    layout = layout_for(context)
    examples = pd.read_parquet(layout.examples)
    train = examples[examples["split"] == "train"]
    _, info = read_review_queue(layout.review_queue)
    decisions = DecisionStore.open().current(layout.run_id)
    curated = curate(train, decisions, num_classes=info.get("num_classes"))
    write_frame(curated.frame, layout.curated_set)
    relabelled = curated.frame[curated.frame["action"] == "relabel"]
    metrics = {
        "z0inf.curated_size": curated.size,
        "z0inf.curated_dropped": len(curated.dropped_ids),
        "z0inf.curated_relabelled": len(curated.relabels),
    }
    mlflow.log_outputs(layout.run_id, "curated_training_set", [layout.curated_set], metrics)
    context.log.info(
        f"curated training set: {curated.size} of {len(train)} examples kept, "
        f"{len(curated.dropped_ids)} dropped, {len(curated.relabels)} relabelled"
    )
    return dg.MaterializeResult(
        metadata={
            "kept": curated.size,
            "dropped": len(curated.dropped_ids),
            "relabelled": len(curated.relabels),
            "decisions": len(decisions),
            "dropped_ids": dg.MetadataValue.json(list(curated.dropped_ids)),
            "relabels": dg.MetadataValue.md(markdown_table(relabelled[["example_id", "observed_label", "label"]], 25)),
            "dagster/row_count": curated.size,
            **path_metadata(curated_training_set=layout.curated_set),
        }
    )
