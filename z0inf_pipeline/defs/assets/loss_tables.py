"""Stage 2: the run's per-example loss tables, plus the last checkpoint's predictions.

Recomputing them (every checkpoint on every example) is the pipeline's heaviest work, so it is spread
with Dagster's own fan-out: ``plan_loss_shards`` splits each split's examples into shards of whole
batches, one ``compute_loss_shard`` step per shard (GPU-tagged, so executors can route them to GPU
workers) writes its part through the ``loss_shards`` IO manager, and ``assemble_loss_tables`` fills
the tables shard by shard. Shards start on batch boundaries, so the result is the same bytes as the
unsharded computation.
"""

import math

import dagster as dg
import numpy as np
import pandas as pd
import torch

from ...errors import InputError
from ...influence.loss_tables import LossTable, read_loss_table
from ...training.reevaluate import (
    max_deviation,
    rebuild_data,
    shard_of,
    split_loss_table,
    split_predictions,
)
from ..config import LossTableConfig
from ..metadata import rounded, run_id_of
from ..partitions import LOSS_SHARDS_KEY, PER_RUN, RUN_OUTPUTS_KEY
from ..resources import GPU_STEP_TAGS, ComputeResource, MlflowResource
from ..storage import LossShard, LossTables, ShardLosses

# Recomputed and logged cross-entropy agree to float32 rounding; anything larger means the
# checkpoints and the loss tables of the run do not belong together.
LOGGED_TOLERANCE = 1e-3
SPLITS = ("train", "test")


def shard_bounds(examples: int, shard_size: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard: ``shard_size`` rounded up to whole batches, so every shard is
    evaluated in the same batches as the unsharded split (and gives the same bits)."""
    size = math.ceil(shard_size / batch_size) * batch_size
    return [(start, min(start + size, examples)) for start in range(0, examples, size)]


@dg.op(out=dg.DynamicOut(LossShard, io_manager_key=LOSS_SHARDS_KEY))
def plan_loss_shards(
    context: dg.OpExecutionContext,
    config: LossTableConfig,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    compute: ComputeResource,
):
    """Decide where the tables come from (recomputed when the run's data can be rebuilt) and split each
    split's examples into shards; logged tables are read whole, one shard per split."""
    run = mlflow.fetch(run_id_of(context))
    data = None if config.source == "logged" else rebuild_data(run.run_id, run.train_config, run.model_spec, training_run)
    if data is None and (config.source == "recompute" or config.loss != "cross_entropy"):
        raise InputError(
            f"run {run.run_id}: loss tables can only be recomputed (source={config.source!r}, loss={config.loss!r}) "
            "for runs whose training config rebuilds their data; use source='logged' with loss='cross_entropy'"
        )
    if data is None:
        context.log.info(f"run {run.run_id}: using the logged loss tables (source={config.source!r})")
        shards = [LossShard(split, 0, -1, "logged", config.loss) for split in SPLITS]
    else:
        sizes = {"train": len(data.train), "test": len(data.test)}
        shards = [
            LossShard(split, start, stop, "recomputed", config.loss)
            for split in SPLITS
            for start, stop in shard_bounds(sizes[split], config.shard_size, compute.batch_size)
        ]
    context.log.info(f"loss tables of run {run.run_id}: {len(shards)} shard(s) ({config.shard_size} examples each)")
    for shard in shards:
        yield dg.DynamicOutput(shard, mapping_key=shard.key)


@dg.op(out=dg.Out(ShardLosses, io_manager_key=LOSS_SHARDS_KEY), tags=GPU_STEP_TAGS)
def compute_loss_shard(
    context: dg.OpExecutionContext,
    shard: LossShard,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> ShardLosses:
    """One shard's losses at every checkpoint (and the last checkpoint's predictions), on the compute device."""
    run = mlflow.fetch(run_id_of(context))
    if shard.source == "logged":
        logged = run.train_losses if shard.split == "train" else run.test_losses
        return ShardLosses(shard, read_loss_table(logged, expected_steps=run.steps))
    data = rebuild_data(run.run_id, run.train_config, run.model_spec, training_run)
    examples = shard_of(data.train if shard.split == "train" else data.test, shard.start, shard.stop)
    device, dtype = compute.torch_device(), compute.torch_dtype()
    options = {"device": device, "dtype": dtype, "batch_size": compute.batch_size}
    table = split_loss_table(run.build_model, run.checkpoints, examples, shard.loss, **options)
    predictions = split_predictions(run.load_model(), shard.split, examples, **options)
    context.log.info(f"shard {shard.key}: {len(examples)} examples x {len(run.steps)} checkpoints on {compute.describe()}")
    return ShardLosses(shard, table, predictions)


@dg.op(out=dg.Out(LossTables, io_manager_key=RUN_OUTPUTS_KEY))
def assemble_loss_tables(
    context: dg.OpExecutionContext,
    parts: list,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.Output[LossTables]:
    """The train and test tables filled in shard by shard (one shard's losses in memory beside them),
    checked against the logged tables when recomputed with cross-entropy. ``parts`` are the shards'
    ``StoredShardLosses`` handles (``ShardLosses`` themselves when run in memory)."""
    run = mlflow.fetch(run_id_of(context))
    parts = sorted(parts, key=lambda p: (SPLITS.index(p.shard.split), p.shard.start))
    first = parts[0].shard
    tables, predictions = {}, []
    for split in SPLITS:
        ours = [p for p in parts if p.shard.split == split]
        sizes = [p.shard.stop - p.shard.start for p in ours]
        values, ids, steps = None, None, None
        for part in ours:
            table = part.table
            if values is None:  # sized by the first shard's steps; a logged shard is the whole table
                total = table.values.shape[1] if part.shard.source == "logged" else sum(sizes)
                values = torch.empty((len(table.steps), total), dtype=table.values.dtype)
                ids, steps = np.empty(total, dtype=np.int64), table.steps
            start = 0 if part.shard.source == "logged" else part.shard.start
            values[:, start : start + table.values.shape[1]] = table.values
            ids[start : start + table.values.shape[1]] = table.example_ids
            part_predictions = part.predictions
            if part_predictions is not None:
                predictions.append(part_predictions)
        tables[split] = LossTable(ids, steps, values)
    metadata: dict = {"source": first.source, "loss": first.loss, "shards": len(parts)}
    if first.source == "recomputed" and first.loss == "cross_entropy":
        logged_train = read_loss_table(run.train_losses, expected_steps=run.steps)
        logged_test = read_loss_table(run.test_losses, expected_steps=run.steps)
        deviation = max(max_deviation(tables["train"], logged_train), max_deviation(tables["test"], logged_test))
        metadata["max_deviation_from_logged"] = rounded(deviation)
        if deviation > LOGGED_TOLERANCE:
            raise InputError(
                f"run {run.run_id}: losses recomputed from the checkpoints differ from the logged loss tables "
                f"by up to {deviation:.3g} (tolerance {LOGGED_TOLERANCE}); checkpoints and tables do not match"
            )
    if first.source == "logged":
        prediction_frame = _text_answers(run, training_run)
        if prediction_frame is None:
            context.log.warning(f"run {run.run_id}: logged loss tables, no predictions")
        else:
            test_rows = prediction_frame[prediction_frame["split"] == "test"]
            metadata["final_test_accuracy"] = rounded(test_rows["correct"].mean())
    else:
        prediction_frame = pd.concat(predictions, ignore_index=True)
        test_rows = prediction_frame[prediction_frame["split"] == "test"]
        metadata["final_test_accuracy"] = rounded((test_rows["predicted_label"] == test_rows["label"]).mean())
    train, test = tables["train"], tables["test"]
    context.log.info(
        f"loss tables {first.source} from {len(parts)} shard(s): T={len(train.steps)}, "
        f"{len(train.example_ids)} train / {len(test.example_ids)} test examples"
    )
    metadata.update(
        {
            "device": str(compute.torch_device()),
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
    return dg.Output(LossTables(train, test, prediction_frame), metadata=metadata)


def _text_answers(run, training_run: pd.DataFrame) -> pd.DataFrame | None:
    """For a run of the LM recipe (its data is text, not rebuilt as tensors): the last checkpoint's answer
    to every example, right or wrong, so the review page can list wrong answers; None for other runs."""
    from ...training.lm import RECIPE, LMRecipe, answer_predictions

    if not run.train_config or run.train_config.get("recipe") != RECIPE:
        return None
    return answer_predictions(run.load_model(), training_run, LMRecipe.from_dict(run.train_config))


def _shard_config(config: LossTableConfig) -> dict:
    """The asset's launchpad config (``ops: loss_tables: config: ...``) handed to the planning step;
    Dagster passes it as the checked dict."""
    settings = config if isinstance(config, dict) else config.model_dump()
    return {"plan_loss_shards": {"config": settings}}


@dg.graph_asset(
    partitions_def=PER_RUN["partitions_def"],
    group_name=PER_RUN["group_name"],
    kinds={"pytorch", "parquet"},
    config=dg.ConfigMapping(config_fn=_shard_config),
)
def loss_tables(training_run: pd.DataFrame):
    """Train and test loss tables (one column per checkpoint, in step order), evaluated on the compute
    device from the checkpoints, shard by shard, when the run's data can be rebuilt, and the last
    checkpoint's predictions for the review queue."""
    shards = plan_loss_shards(training_run)
    parts = shards.map(lambda shard: compute_loss_shard(shard, training_run))
    return assemble_loss_tables(parts.collect(), training_run)
