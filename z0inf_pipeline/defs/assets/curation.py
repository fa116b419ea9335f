"""Stage 7: the training set as reviewed: dropped examples removed, relabels applied."""

import dagster as dg
import pandas as pd

from ...review import curate
from ..metadata import run_id_of, table_metadata
from ..partitions import PER_RUN
from ..resources import DecisionStoreResource, MlflowResource
from ..storage import ReviewQueue


@dg.asset(**PER_RUN, kinds={"parquet"})
def curated_training_set(
    context: dg.AssetExecutionContext,
    review_queue: ReviewQueue,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    decisions: DecisionStoreResource,
) -> dg.Output[pd.DataFrame]:
    """Every decision in force for the run (flagged or not) applied to its training examples. Runs only
    after the blocking review gate on ``review_queue`` passed in the same run."""
    run_id = run_id_of(context)
    train = training_run[training_run["split"] == "train"]
    current = decisions.open().current(run_id)
    curated = curate(train, current, num_classes=review_queue.info.get("num_classes"))
    relabelled = curated.frame[curated.frame["action"] == "relabel"]
    mlflow.log_metrics(
        run_id,
        {
            "z0inf.curated_size": curated.size,
            "z0inf.curated_dropped": len(curated.dropped_ids),
            "z0inf.curated_relabelled": len(curated.relabels),
        },
    )
    context.log.info(
        f"curated training set: {curated.size} of {len(train)} examples kept, "
        f"{len(curated.dropped_ids)} dropped, {len(curated.relabels)} relabelled"
    )
    return dg.Output(
        curated.frame,
        metadata={
            **mlflow.run_metadata(run_id),
            "kept": curated.size,
            "dropped": len(curated.dropped_ids),
            "relabelled": len(curated.relabels),
            "decisions": len(current),
            "dropped_ids": dg.MetadataValue.json(list(curated.dropped_ids)),
            "relabels": table_metadata(
                relabelled[["example_id", "observed_label", "label"]].rename(columns={"label": "new_label"}), 25
            ),
            "dagster/row_count": curated.size,
        },
    )
