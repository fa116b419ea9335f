"""Stage 5: train-test influence, kept as the top-k proponents and opponents of every test example.

The default method (random directions) runs 2 P forward passes over every training and test example at
each perturbed checkpoint: per-example work, spread like the loss tables with Dagster's own fan-out.
``plan_projection_shards`` splits each split's examples into shards, one ``compute_projection_shard``
step per shard (GPU-tagged) writes that shard's rows of the factors (examples x checkpoints x
directions) through the ``loss_shards`` IO manager, and ``assemble_train_test_influence`` streams the
training shards one at a time into a running top k per test example, so the N x (P C) factors never
exist whole. Shards start on whole compute batches and top-k tiles, so the frame is the same numbers as
one shard's. The other methods (and directions with a trajectory term, which standardises by each test
example's spread over all training examples) plan no shards and run whole in the final step.
"""

import math

import dagster as dg
import pandas as pd
import torch

from ...errors import InputError
from ...influence.analysis import InfluenceArguments, TrainTestArguments, train_test_direction_features
from ...influence.checkpoints import open_checkpoints
from ...influence.estimators import InfluenceFactors
from ...training.reevaluate import forward_access, rebuild_data, refuse_unfit_method
from ..config import TopKConfig
from ..metadata import run_id_of, table_metadata
from ..partitions import LOSS_SHARDS_KEY, PER_RUN, RUN_OUTPUTS_KEY
from ..resources import GPU_STEP_TAGS, ComputeResource, MlflowResource
from ..storage import Gram, LossTables, ProjectionShard, ShardProjections
from .loss_tables import shard_bounds
from .self_influence import analysis_from_gram

SPLITS = ("train", "test")
# A projection shard's float64 rows, when the launchpad sets no shard size: the step holding them and the
# final step reading them one at a time stay well under 2 GB (at 262,144 examples of P = 256, C = 2 a
# shard was 1 GiB, and a worker peaked at 2.3 GB at 10^6 examples).
SHARD_PROJECTION_BYTES = 256 * 2**20


def topk_tile_rows(k: int, batch_size: int) -> int:
    """Training examples per top-k tile of the sharded path: whole compute batches, at least k. Shards are
    whole tiles, so every tile is the same product whatever the shard size."""
    return math.ceil(k / batch_size) * batch_size


@dg.op(out=dg.DynamicOut(ProjectionShard, io_manager_key=LOSS_SHARDS_KEY))
def plan_projection_shards(
    context: dg.OpExecutionContext,
    config: TopKConfig,
    training_run: pd.DataFrame,
    loss_tables: LossTables,
    weight_gram: Gram,
    mlflow: MlflowResource,
    compute: ComputeResource,
):
    """Refuse a method unfit for the run, and split the examples into shards when the method is random
    directions (without a trajectory term) and the run's data can be rebuilt; no shards otherwise."""
    run = mlflow.fetch(run_id_of(context))
    args, train_test = config.settings(InfluenceArguments), config.train_test.settings(TrainTestArguments)
    try:
        refuse_unfit_method(run.run_id, run.train_config, train_test.method)
    except InputError as unfit:
        raise dg.Failure(str(unfit)) from None
    if train_test.method != "directions" or train_test.trajectory_weight > 0:
        context.log.info(f"train-test method {train_test.method}: computed whole in one step")
        return
    if rebuild_data(run.run_id, run.train_config, run.model_spec, training_run) is None:
        return  # the final step falls back to the trajectory and says so
    # the parameters the Gram was computed over (and the Gram checked against the checkpoints)
    parameters = tuple(analysis_from_gram(run, loss_tables, weight_gram, args, "cpu").parameter_names)
    sizes = {"train": len(loss_tables.train_ids()), "test": len(loss_tables.test_ids())}
    tile = topk_tile_rows(min(args.topk, sizes["train"]), compute.batch_size)
    shard_size = config.shard_size or max(1, SHARD_PROJECTION_BYTES // (8 * train_test.directions
                                                                         * train_test.direction_checkpoints))
    shards = [
        ProjectionShard(split, start, stop, parameters, train_test.to_dict())
        for split in SPLITS
        for start, stop in shard_bounds(sizes[split], shard_size, tile)
    ]
    context.log.info(f"random-direction projections of run {run.run_id}: {len(shards)} shard(s) "
                     f"({shard_size} examples each, rounded up to {tile})")
    for shard in shards:
        yield dg.DynamicOutput(shard, mapping_key=shard.key)


@dg.op(out=dg.Out(ShardProjections, io_manager_key=LOSS_SHARDS_KEY), tags=GPU_STEP_TAGS)
def compute_projection_shard(
    context: dg.OpExecutionContext,
    shard: ProjectionShard,
    training_run: pd.DataFrame,
    loss_tables: LossTables,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> ShardProjections:
    """One shard's rows of the random-direction factors, on the compute device."""
    run = mlflow.fetch(run_id_of(context))
    data = rebuild_data(run.run_id, run.train_config, run.model_spec, training_run)
    ids = (loss_tables.train_ids() if shard.split == "train" else loss_tables.test_ids())[shard.start : shard.stop]
    train_ids, test_ids = (ids, ids[:0]) if shard.split == "train" else (ids[:0], ids)
    forward = forward_access(run.build_model, data, train_ids, test_ids, dtype=compute.torch_dtype())
    train, test = train_test_direction_features(
        open_checkpoints(run.checkpoints), shard.parameters, TrainTestArguments(**shard.train_test), forward,
        device=compute.torch_device(), batch_size=compute.batch_size,
    )
    context.log.info(f"shard {shard.key}: {len(ids)} examples x {train.shape[1]} projections on {compute.describe()}")
    return ShardProjections(shard, train if shard.split == "train" else test)


@dg.op(out=dg.Out(pd.DataFrame, io_manager_key=RUN_OUTPUTS_KEY), tags=GPU_STEP_TAGS)
def assemble_train_test_influence(
    context: dg.OpExecutionContext,
    config: TopKConfig,
    parts: list,
    training_run: pd.DataFrame,
    loss_tables: LossTables,
    weight_gram: Gram,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.Output[pd.DataFrame]:
    """The top-k frame: from the projection shards when there are any (the test shards held whole, the
    training shards read one at a time), else computed whole here. ``parts`` are the shards'
    ``StoredShardProjections`` handles (``ShardProjections`` themselves when run in memory)."""
    run = mlflow.fetch(run_id_of(context))
    args, train_test = config.settings(InfluenceArguments), config.train_test.settings(TrainTestArguments)
    device = compute.torch_device()
    if parts:
        parts = sorted(parts, key=lambda p: (SPLITS.index(p.shard.split), p.shard.start))
        analysis = analysis_from_gram(run, loss_tables, weight_gram, args, device, with_test=True,
                                      train_test=train_test)
        test = torch.cat([p.projections for p in parts if p.shard.split == "test"]).to(device)
        chunks = (InfluenceFactors(p.projections.to(device), test, None, None) for p in parts if p.shard.split == "train")
        k = min(args.topk, len(analysis.train.example_ids))
        frame = analysis.topk_frame(chunks, tile_rows=topk_tile_rows(k, compute.batch_size))
        method, fallback = "directions", None
    else:
        data = rebuild_data(run.run_id, run.train_config, run.model_spec, training_run)
        forward = forward_access(run.build_model, data, loss_tables.train_ids(), loss_tables.test_ids(),
                                 dtype=compute.torch_dtype())
        analysis = analysis_from_gram(run, loss_tables, weight_gram, args, device, with_test=True,
                                      train_test=train_test, forward=forward)
        frame = analysis.topk_frame()
        method, fallback = analysis.train_test_method
    if fallback:
        context.log.warning(f"run {run.run_id}: {fallback}")
    k = int(frame["rank"].max())
    # Training examples that most often top a test example's proponent or opponent list.
    top1 = frame[frame["rank"] == 1]
    context.log.info(f"top-{k} influence for {frame['test_example_id'].nunique()} test examples "
                     f"({len(parts)} projection shard(s))")
    return dg.Output(
        frame,
        metadata={
            "estimator": dg.MetadataValue.json(args.to_dict()),
            "train_test_estimator": dg.MetadataValue.json(train_test.to_dict()),
            "method": method,
            **({"fallback": fallback} if fallback else {}),
            "shards": len(parts),
            "test_examples": int(frame["test_example_id"].nunique()),
            "k": k,
            "dagster/row_count": len(frame),
            **{
                f"frequent_top_{role}s": table_metadata(
                    top1[f"{role}_id"].value_counts().rename_axis("training example").reset_index(name="test examples"),
                    10,
                )
                for role in ("proponent", "opponent")
            },
        },
    )


def _topk_config(config: TopKConfig) -> dict:
    """The asset's launchpad config (``ops: train_test_influence: config: ...``) handed to the planning and
    the final step; Dagster passes it as the checked dict."""
    settings = config if isinstance(config, dict) else config.model_dump()
    return {name: {"config": settings} for name in ("plan_projection_shards", "assemble_train_test_influence")}


@dg.graph_asset(
    partitions_def=PER_RUN["partitions_def"],
    group_name=PER_RUN["group_name"],
    kinds={"pytorch", "parquet"},
    config=dg.ConfigMapping(config_fn=_topk_config),
)
def train_test_influence(training_run: pd.DataFrame, loss_tables: LossTables, weight_gram: Gram):
    """INF(i, z) = sum_t eta_t <g_i(t), g_z(t)>: for each test example z the k training examples that
    helped it most (proponents) and hurt it most (opponents); the full N x M matrix never exists.
    By default INF comes from forward passes along random directions (``TrainTestArguments``), shard by
    shard; a run whose data cannot be rebuilt here gets trajectory-only Z0-Inf, and the metadata says so."""
    shards = plan_projection_shards(training_run, loss_tables, weight_gram)
    parts = shards.map(lambda shard: compute_projection_shard(shard, training_run, loss_tables))
    return assemble_train_test_influence(parts.collect(), training_run, loss_tables, weight_gram)
