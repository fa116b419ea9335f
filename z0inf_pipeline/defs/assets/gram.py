"""Stage 3: the (T, T) weight Gram matrix, the only pass over the checkpoints' weights."""

import dagster as dg

from ...influence.analysis import InfluenceAnalysis, InfluenceArguments, write_frame
from ..config import GramConfig
from ..metadata import layout_for, path_metadata
from ..partitions import mlflow_runs
from ..resources import ComputeResource, MlflowResource
from .loss_tables import loss_tables


@dg.asset(partitions_def=mlflow_runs, group_name="z0inf", deps=[loss_tables], kinds={"pytorch", "parquet"})
def weight_gram(
    context: dg.AssetExecutionContext, config: GramConfig, mlflow: MlflowResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """G = W W^T over the checkpoints (float64, streamed tensor by tensor): after it, influence costs
    nothing that depends on the model size."""
    layout = layout_for(context)
    run = mlflow.fetch(layout.run_id)
    args = InfluenceArguments(parameters=tuple(config.parameters) if config.parameters else None, center=config.center)
    analysis = InfluenceAnalysis(run.checkpoints, layout.train_losses, args=args, device=compute.torch_device())
    frame = analysis.gram_frame()
    write_frame(frame, layout.gram)
    mlflow.log_outputs(run.run_id, "weight_gram", [layout.gram])
    diagonal = analysis.gram.diagonal()
    context.log.info(f"Gram over {len(analysis.steps)} checkpoints, {len(analysis.parameter_names)} tensors")
    return dg.MaterializeResult(
        metadata={
            "checkpoints": len(analysis.steps),
            "parameters": dg.MetadataValue.json(list(analysis.parameter_names)),
            "centered": config.center,
            "device": str(compute.torch_device()),
            "trace": float(diagonal.sum()),
            **path_metadata(gram=layout.gram),
        }
    )
