"""Stage 2: the run's per-example loss tables, plus the last checkpoint's predictions."""

import dagster as dg
import pandas as pd

from ...influence.errors import InfluenceInputError
from ...influence.loss_tables import read_loss_table
from ...review.run_data import final_predictions, max_deviation, rebuild_data, recompute_loss_tables
from ..config import LossTableConfig
from ..metadata import rounded, run_id_of
from ..partitions import PER_RUN
from ..resources import GPU_STEP_TAGS, ComputeResource, MlflowResource
from ..storage import LossTables

# Recomputed and logged cross-entropy agree to float32 rounding; anything larger means the
# checkpoints and the loss tables of the run do not belong together.
LOGGED_TOLERANCE = 1e-3


@dg.asset(**PER_RUN, kinds={"pytorch", "parquet"}, op_tags=GPU_STEP_TAGS)
def loss_tables(
    context: dg.AssetExecutionContext,
    config: LossTableConfig,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.Output[LossTables]:
    """Train and test loss tables (one column per checkpoint, in step order), evaluated on the compute
    device from the checkpoints when the run's data can be rebuilt, and the last checkpoint's
    predictions for the review queue."""
    run = mlflow.fetch(run_id_of(context))
    data = None if config.source == "logged" else rebuild_data(run.run_id, run.train_config, run.model_spec, training_run)
    if data is None and (config.source == "recompute" or config.loss != "cross_entropy"):
        raise InfluenceInputError(
            f"run {run.run_id}: loss tables can only be recomputed (source={config.source!r}, loss={config.loss!r}) "
            "for runs whose training config rebuilds their data; use source='logged' with loss='cross_entropy'"
        )
    device, dtype = compute.torch_device(), compute.torch_dtype()
    logged_train = read_loss_table(run.train_losses, expected_steps=run.steps)
    logged_test = read_loss_table(run.test_losses, expected_steps=run.steps)
    metadata: dict = {"source": "logged" if data is None else "recomputed", "loss": config.loss}
    if data is None:
        predictions = _text_answers(run, training_run)
        tables = LossTables(logged_train, logged_test, predictions)
        if predictions is None:
            context.log.warning(f"run {run.run_id}: using the logged loss tables (source={config.source!r}), no predictions")
        else:
            metadata["final_test_accuracy"] = rounded(predictions.loc[predictions["split"] == "test", "correct"].mean())
    else:
        train, test = recompute_loss_tables(
            run.build_model, run.checkpoints, data, config.loss, device=device, dtype=dtype, batch_size=compute.batch_size
        )
        if config.loss == "cross_entropy":
            deviation = max(max_deviation(train, logged_train), max_deviation(test, logged_test))
            metadata["max_deviation_from_logged"] = rounded(deviation)
            if deviation > LOGGED_TOLERANCE:
                raise InfluenceInputError(
                    f"run {run.run_id}: losses recomputed from the checkpoints differ from the logged loss tables "
                    f"by up to {deviation:.3g} (tolerance {LOGGED_TOLERANCE}); checkpoints and tables do not match"
                )
        predictions = final_predictions(run.load_model(), data, device=device, dtype=dtype, batch_size=compute.batch_size)
        tables = LossTables(train, test, predictions)
        test_rows = predictions[predictions["split"] == "test"]
        metadata["final_test_accuracy"] = rounded((test_rows["predicted_label"] == test_rows["label"]).mean())
    train, test = tables.train_table(), tables.test_table()
    context.log.info(
        f"loss tables {metadata['source']} on {compute.describe()}: T={len(train.steps)}, "
        f"{len(train.example_ids)} train / {len(test.example_ids)} test examples"
    )
    metadata.update(
        {
            "device": str(device),
            "dtype": compute.dtype,
            "checkpoints": len(train.steps),
            "steps": dg.MetadataValue.json(list(train.steps)),
            "train_examples": len(train.example_ids),
            "test_examples": len(test.example_ids),
            "final_mean_train_loss": rounded(train.values[-1].mean()),
            "final_mean_test_loss": rounded(test.values[-1].mean()),
            "dagster/row_count": len(train.example_ids),
        }
    )
    return dg.Output(tables, metadata=metadata)


def _text_answers(run, training_run: pd.DataFrame) -> pd.DataFrame | None:
    """For a run of the LM recipe (its data is text, not rebuilt as tensors): the last checkpoint's answer
    to every example, right or wrong, so the review page can list wrong answers; None for other runs."""
    from ...training.lm import RECIPE, LMRecipe, answer_predictions

    if not run.train_config or run.train_config.get("recipe") != RECIPE:
        return None
    return answer_predictions(run.load_model(), training_run, LMRecipe.from_dict(run.train_config))
