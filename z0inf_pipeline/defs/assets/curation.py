"""Stage 7: the training set as reviewed: dropped examples removed, relabels and edited target texts applied."""

import dagster as dg
import pandas as pd

from ...review import curate, lineage_decisions, lineage_of
from ...review.gate import queue_gate
from ...review.lineage import DECISIONS_THROUGH
from ..metadata import run_id_of, table_metadata
from ..partitions import PER_RUN
from ..resources import DecisionStoreResource, MlflowResource
from ..storage import ReviewQueue
from .retraining import refuse_second_retrain


def edited_targets(curated: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Each edited example with its prompt, its target as trained and the reviewer's new one."""
    edited = curated.loc[curated["action"] == "edit_target", ["example_id", "target_text"]]
    trained = examples.set_index("example_id").reindex(edited["example_id"])
    return pd.DataFrame({"example_id": edited["example_id"].to_numpy(), "prompt": trained["prompt"].to_numpy(),
                         "observed_target": trained["target"].to_numpy(), "new_target": edited["target_text"].to_numpy()})


@dg.asset(**PER_RUN, kinds={"parquet"}, output_required=False)
def curated_training_set(
    context: dg.AssetExecutionContext,
    review_queue: ReviewQueue,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    decisions: DecisionStoreResource,
):
    """Every decision in force for the run (its own and its ancestors', flagged or not) applied to its
    training examples, as the store held them at one moment: its high-water mark travels with the
    frame (``attrs``) and the metadata, so a decision recorded later is not shown as applied; it
    takes effect at the next retrain. Only once the review gate is open: while it is shut nothing is
    curated (no output), so ``retrained_run`` is skipped and the run ends successful with the gate's
    message (``review_gate`` reports the same state)."""
    run_id = run_id_of(context)
    refuse_second_retrain(context, run_id)  # before the curated set of the retrain in flight is overwritten
    store = decisions.open()
    through = store.high_water_mark()
    current = lineage_decisions(store, run_id, review_queue.info, through=through)
    gate = queue_gate(review_queue.queue, review_queue.info, current)  # the same reading as review_gate's
    if not gate.passed:
        context.log.info(f"nothing curated or retrained: {gate.message()}")
        return
    train = training_run[training_run["split"] == "train"]
    curated = curate(train, current, num_classes=review_queue.info.get("num_classes"), run_id=run_id)
    curated.frame.attrs[DECISIONS_THROUGH] = through
    relabelled = curated.frame[curated.frame["action"] == "relabel"]
    mlflow.log_metrics(
        run_id,
        {
            "z0inf.curated_size": curated.size,
            "z0inf.curated_dropped": len(curated.dropped_ids),
            "z0inf.curated_relabelled": len(curated.relabels),
            "z0inf.curated_target_edits": len(curated.target_edits),
        },
    )
    context.log.info(
        f"curated training set: {curated.size} of {len(train)} examples kept, "
        f"{len(curated.dropped_ids)} dropped, {len(curated.relabels)} relabelled, "
        f"{len(curated.target_edits)} with an edited target text "
        f"(decisions of {len(lineage_of(run_id, review_queue.info))} lineage run(s) recorded up to #{through})"
    )
    yield dg.Output(
        curated.frame,
        metadata={
            **mlflow.run_metadata(run_id),
            "kept": curated.size,
            "dropped": len(curated.dropped_ids),
            "relabelled": len(curated.relabels),
            "target_edits": len(curated.target_edits),
            "decisions": len(current),
            "inherited_decisions": int((current["decided_on_run"] != run_id).sum()),
            DECISIONS_THROUGH: through,
            "dropped_ids": dg.MetadataValue.json(list(curated.dropped_ids)),
            "relabels": table_metadata(
                relabelled[["example_id", "observed_label", "label"]].rename(columns={"label": "new_label"}), 25
            ),
            **({"edited_targets": table_metadata(edited_targets(curated.frame, training_run), 25)}
               if curated.target_edits else {}),
            "dagster/row_count": curated.size,
        },
    )
