"""Stage 4: Z0 self-influence of every training example."""

from dataclasses import replace

import dagster as dg

from ...influence.analysis import InfluenceAnalysis, InfluenceArguments, read_gram_file, write_frame
from ..config import EstimatorConfig
from ..metadata import layout_for, path_metadata, quantiles
from ..partitions import mlflow_runs
from ..resources import ComputeResource, MlflowResource
from .gram import weight_gram


def analysis_from_gram(layout, run, args: InfluenceArguments, device, *, with_test: bool = False) -> InfluenceAnalysis:
    """An analysis of the run that reuses the materialised Gram instead of reading the weights again, over
    the parameters the Gram was configured with (its provenance record; the checkpoints are still checked)."""
    test_losses = layout.test_losses if with_test else None
    recorded = read_gram_file(layout.gram)[2]
    if recorded is not None:
        args = replace(args, parameters=recorded.parameters, center=recorded.center)
    return InfluenceAnalysis(run.checkpoints, layout.train_losses, test_losses, args=args, device=device, gram=layout.gram)


@dg.asset(partitions_def=mlflow_runs, group_name="z0inf", deps=[weight_gram], kinds={"pytorch", "parquet"})
def self_influence(
    context: dg.AssetExecutionContext, config: EstimatorConfig, mlflow: MlflowResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """SI(i) = sum_t eta_t ||g_i(t)||^2 (high: the model had to move far just for i), and the cheap
    variance estimator beside it."""
    layout = layout_for(context)
    run = mlflow.fetch(layout.run_id)
    args = config.to_arguments()
    frame = analysis_from_gram(layout, run, args, compute.torch_device()).self_influence_frame()
    write_frame(frame, layout.self_influence)
    summary = quantiles(frame["self_influence"], "z0inf.self_influence")
    mlflow.log_outputs(run.run_id, "self_influence", [layout.self_influence], summary)
    context.log.info(
        f"self-influence of {len(frame)} training examples: median {summary['z0inf.self_influence_q50']:.4g}"
    )
    return dg.MaterializeResult(
        metadata={
            "estimator": dg.MetadataValue.json(args.to_dict()),
            "device": str(compute.torch_device()),
            "dagster/row_count": len(frame),
            **{k.removeprefix("z0inf."): v for k, v in summary.items()},
            **path_metadata(self_influence=layout.self_influence),
        }
    )
