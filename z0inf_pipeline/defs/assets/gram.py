"""Stage 3: the (T, T) weight Gram matrix, the estimators' one pass over the checkpoints' weights."""

import dagster as dg

from ...influence.analysis import GramProvenance, gram_to_frame, write_frame
from ...influence.checkpoints import open_checkpoints, select_parameters
from ...influence.gram import gram_matrix
from ..config import GramConfig
from ..metadata import layout_for, path_metadata
from ..partitions import mlflow_runs
from ..resources import ComputeResource, MlflowResource
from .loss_tables import loss_tables


@dg.asset(partitions_def=mlflow_runs, group_name="z0inf", deps=[loss_tables], kinds={"pytorch", "parquet"})
def weight_gram(
    context: dg.AssetExecutionContext, config: GramConfig, mlflow: MlflowResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """G = W W^T over the checkpoints (float64, streamed tensor by tensor): after it, the estimators
    cost nothing that depends on the model size."""
    layout = layout_for(context)
    run = mlflow.fetch(layout.run_id)
    checkpoints = open_checkpoints(run.checkpoints)
    names = select_parameters(checkpoints, config.parameters or None)
    gram = gram_matrix(checkpoints, parameters=names, center=config.center, device=compute.torch_device())
    provenance = GramProvenance.of(checkpoints, names, config.center)
    write_frame(gram_to_frame([c.step for c in checkpoints], gram, provenance), layout.gram)
    mlflow.log_outputs(run.run_id, "weight_gram", [layout.gram])
    diagonal = gram.diagonal()
    context.log.info(f"Gram over {len(checkpoints)} checkpoints, {len(names)} tensors")
    return dg.MaterializeResult(
        metadata={
            "checkpoints": len(checkpoints),
            "parameters": dg.MetadataValue.json(names),
            "centered": config.center,
            "device": str(compute.torch_device()),
            "trace": float(diagonal.sum()),
            **path_metadata(gram=layout.gram),
        }
    )
