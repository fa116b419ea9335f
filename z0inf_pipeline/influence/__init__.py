"""The pure Z0-Inf core: tensors and files in, influence scores out. No Dagster, no MLflow."""

from .checkpoints import (
    Checkpoint,
    load_state_dict,
    open_checkpoints,
    read_checkpoint,
    save_checkpoint,
    select_parameters,
)
from .estimators import (
    DegenerateCheckpointWarning,
    TopKInfluence,
    center_per_checkpoint,
    checkpoint_kernels,
    neighbor_indices,
    self_influence,
    train_test_influence,
    train_test_topk,
    trajectory_rank_factors,
    variance_self_influence,
    warmup_window,
)
from .gram import gram_matrix
from .loss_tables import LossTable, compute_loss_table, evaluate_losses, read_loss_table

__all__ = [
    "Checkpoint",
    "DegenerateCheckpointWarning",
    "LossTable",
    "TopKInfluence",
    "center_per_checkpoint",
    "checkpoint_kernels",
    "compute_loss_table",
    "evaluate_losses",
    "gram_matrix",
    "load_state_dict",
    "neighbor_indices",
    "open_checkpoints",
    "read_checkpoint",
    "read_loss_table",
    "save_checkpoint",
    "select_parameters",
    "self_influence",
    "train_test_influence",
    "train_test_topk",
    "trajectory_rank_factors",
    "variance_self_influence",
    "warmup_window",
]
