"""Stage 4: every per-example signal of every training example (Z0 self-influence and the loss-table signals)."""


import dagster as dg
import pandas as pd

from ...errors import InputError
from ...influence.analysis import InfluenceAnalysis, InfluenceArguments, TrainTestArguments
from ...influence.directions import ForwardAccess
from ..config import EstimatorConfig
from ..metadata import quantiles, rounded_metadata, run_id_of
from ..partitions import PER_RUN
from ..resources import GPU_STEP_TAGS, ComputeResource, MlflowResource
from ..storage import Gram, LossTables


def analysis_from_gram(run, tables: LossTables, gram: Gram, args: InfluenceArguments, device, *, with_test=False,
                       train_test: TrainTestArguments = TrainTestArguments(), forward: ForwardAccess | None = None):
    """An analysis of the run that reuses the materialised Gram instead of reading the weights again."""
    if list(gram.steps) != list(run.steps):
        raise InputError(
            f"run {run.run_id}: weight_gram was computed for steps {list(gram.steps)}, the checkpoints are at "
            f"{list(run.steps)}; materialise weight_gram again"
        )
    if gram.provenance is not None:  # estimate over the parameters the Gram was configured with
        args = args.replace(parameters=gram.provenance.parameters, center=gram.provenance.center)
    test = tables.test_table() if with_test else None
    analysis = InfluenceAnalysis(run.checkpoints, tables.train_table(), test, args=args, device=device, gram=gram.matrix,
                                 train_test=train_test, forward=forward)
    differences = [] if gram.provenance is None else gram.provenance.differences(analysis.provenance)
    if differences:
        raise InputError(
            f"run {run.run_id}: weight_gram was computed from {'; '.join(differences)}; materialise weight_gram again"
        )
    return analysis


@dg.asset(**PER_RUN, kinds={"pytorch", "parquet"}, op_tags=GPU_STEP_TAGS)
def self_influence(
    context: dg.AssetExecutionContext,
    config: EstimatorConfig,
    loss_tables: LossTables,
    weight_gram: Gram,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.Output[pd.DataFrame]:
    """One column per signal of ``influence.signals`` (the flag policy's ``score`` picks among them):
    SI(i) = sum_t eta_t ||g_i(t)||^2 (high: the model had to move far just for i), the cheap variance
    estimator, and the loss-table signals (mean and final loss, confidence, variability)."""
    run = mlflow.fetch(run_id_of(context))
    args = config.settings(InfluenceArguments)
    frame = analysis_from_gram(run, loss_tables, weight_gram, args, compute.torch_device()).self_influence_frame()
    summary = quantiles(frame["self_influence"], "z0inf.self_influence")
    mlflow.log_metrics(run.run_id, summary)
    context.log.info(f"self-influence of {len(frame)} training examples: median {summary['z0inf.self_influence_q50']:.3g}")
    return dg.Output(
        frame,
        metadata={
            "estimator": dg.MetadataValue.json(args.to_dict()),
            "device": str(compute.torch_device()),
            "dagster/row_count": len(frame),
            **rounded_metadata(summary, strip="z0inf."),
        },
    )
