"""Stage 3: the (T, T) weight Gram matrix, the estimators' one pass over the checkpoints' weights."""

import dagster as dg

from ...influence.analysis import GramProvenance
from ...influence.checkpoints import open_checkpoints, select_parameters
from ...influence.gram import gram_matrix
from ..config import GramConfig
from ..metadata import rounded, run_id_of
from ..partitions import PER_RUN
from ..resources import GPU_STEP_TAGS, ComputeResource, MlflowResource
from ..storage import Gram
from .loss_tables import loss_tables


# After loss_tables (without reading them), so that their blocking check also stops this pass over the weights.
@dg.asset(**PER_RUN, deps=[loss_tables], kinds={"pytorch", "parquet"}, op_tags=GPU_STEP_TAGS)
def weight_gram(
    context: dg.AssetExecutionContext, config: GramConfig, mlflow: MlflowResource, compute: ComputeResource
) -> dg.Output[Gram]:
    """G = W W^T over the checkpoints (float64, streamed tensor by tensor): after it, the estimators
    cost nothing that depends on the model size."""
    run = mlflow.fetch(run_id_of(context))
    checkpoints = open_checkpoints(run.checkpoints)
    names = select_parameters(checkpoints, config.parameters or None)
    matrix = gram_matrix(checkpoints, parameters=names, center=config.center, device=compute.torch_device())
    provenance = GramProvenance.of(checkpoints, names, config.center)
    context.log.info(f"Gram over {len(checkpoints)} checkpoints, {len(names)} tensors")
    return dg.Output(
        Gram(tuple(c.step for c in checkpoints), matrix, provenance),
        metadata={
            "checkpoints": len(checkpoints),
            "parameters": dg.MetadataValue.json(names),
            "centered": config.center,
            "device": str(compute.torch_device()),
            "trace": rounded(matrix.diagonal().sum()),
        },
    )
