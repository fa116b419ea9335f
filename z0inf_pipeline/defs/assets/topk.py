"""Stage 5: train-test influence, kept as the top-k proponents and opponents of every test example."""

import dagster as dg
import pandas as pd

from ...influence.analysis import InfluenceArguments, TrainTestArguments
from ...errors import InputError
from ...training.reevaluate import forward_access, rebuild_data, refuse_unfit_method
from ..config import TopKConfig
from ..metadata import run_id_of, table_metadata
from ..partitions import PER_RUN
from ..resources import GPU_STEP_TAGS, ComputeResource, MlflowResource
from ..storage import Gram, LossTables
from .self_influence import analysis_from_gram


@dg.asset(**PER_RUN, kinds={"pytorch", "parquet"}, op_tags=GPU_STEP_TAGS)
def train_test_influence(
    context: dg.AssetExecutionContext,
    config: TopKConfig,
    training_run: pd.DataFrame,
    loss_tables: LossTables,
    weight_gram: Gram,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.Output[pd.DataFrame]:
    """INF(i, z) = sum_t eta_t <g_i(t), g_z(t)>: for each test example z the k training examples that
    helped it most (proponents) and hurt it most (opponents); the full N x M matrix never exists.
    By default INF comes from forward passes along random directions (``TrainTestArguments``); a run
    whose data cannot be rebuilt here gets trajectory-only Z0-Inf, and the metadata says so."""
    run = mlflow.fetch(run_id_of(context))
    args, train_test = config.settings(InfluenceArguments), config.train_test.settings(TrainTestArguments)
    try:
        refuse_unfit_method(run.run_id, run.train_config, train_test.method)
    except InputError as unfit:
        raise dg.Failure(str(unfit)) from None
    data = rebuild_data(run.run_id, run.train_config, run.model_spec, training_run)
    forward = forward_access(run.build_model, data, loss_tables.train_table().example_ids,
                             loss_tables.test_table().example_ids, dtype=compute.torch_dtype())
    analysis = analysis_from_gram(run, loss_tables, weight_gram, args, compute.torch_device(), with_test=True,
                                  train_test=train_test, forward=forward)
    frame = analysis.topk_frame()
    method, fallback = analysis.train_test_method
    if fallback:
        context.log.warning(f"run {run.run_id}: {fallback}")
    k = int(frame["rank"].max())
    # Training examples that most often top a test example's proponent or opponent list.
    top1 = frame[frame["rank"] == 1]
    context.log.info(f"top-{k} influence for {frame['test_example_id'].nunique()} test examples")
    return dg.Output(
        frame,
        metadata={
            "estimator": dg.MetadataValue.json(args.to_dict()),
            "train_test_estimator": dg.MetadataValue.json(train_test.to_dict()),
            "method": method,
            **({"fallback": fallback} if fallback else {}),
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
