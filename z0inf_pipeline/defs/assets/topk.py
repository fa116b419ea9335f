"""Stage 5: train-test influence, kept as the top-k proponents and opponents of every test example."""

import dagster as dg

from ...influence.analysis import write_frame
from ..config import TopKConfig
from ..metadata import layout_for, markdown_table, path_metadata
from ..partitions import mlflow_runs
from ..resources import ComputeResource, MlflowResource
from .self_influence import analysis_from_gram, self_influence


@dg.asset(partitions_def=mlflow_runs, group_name="z0inf", deps=[self_influence], kinds={"pytorch", "parquet"})
def train_test_influence(
    context: dg.AssetExecutionContext, config: TopKConfig, mlflow: MlflowResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """INF(i, z) = sum_t eta_t <g_i(t), g_z(t)>: for each test example z the k training examples that
    helped it most (proponents) and hurt it most (opponents); the full N x M matrix never exists."""
    layout = layout_for(context)
    run = mlflow.fetch(layout.run_id)
    args = config.to_arguments()
    frame = analysis_from_gram(layout, run, args, compute.torch_device(), with_test=True).topk_frame()
    write_frame(frame, layout.topk)
    # Training examples that most often top a test example's proponent or opponent list.
    top1 = frame[frame["rank"] == 1]
    mlflow.log_outputs(run.run_id, "train_test_influence", [layout.topk])
    context.log.info(f"top-{int(frame['rank'].max())} influence for {frame['test_example_id'].nunique()} test examples")
    return dg.MaterializeResult(
        metadata={
            "estimator": dg.MetadataValue.json(args.to_dict()),
            "test_examples": int(frame["test_example_id"].nunique()),
            "k": int(frame["rank"].max()),
            "dagster/row_count": len(frame),
            **{
                f"frequent_top_{role}s": dg.MetadataValue.md(
                    markdown_table(
                        top1[f"{role}_id"].value_counts().rename_axis("training example").reset_index(name="test examples"),
                        10,
                    )
                )
                for role in ("proponent", "opponent")
            },
            **path_metadata(train_test_topk=layout.topk),
        }
    )
