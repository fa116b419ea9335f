"""Accuracy of influence estimates against retraining: SSRT ground truth, LDS and detection metrics."""

from .ground_truth import (
    LinearDatamodelingScore,
    linear_datamodeling_score,
    random_subsets,
    ssrt_self_influence,
    ssrt_train_test_influence,
)
from .metrics import DetectionScores, average_ranks, columnwise_spearman, detection_scores, spearman
from .retrain import (
    RetrainedModels,
    SubsampleRetraining,
    config_key,
    load_model,
    model_losses,
    retrain_on_subsets,
    subsample_and_retrain,
)

__all__ = [
    "DetectionScores",
    "LinearDatamodelingScore",
    "RetrainedModels",
    "SubsampleRetraining",
    "average_ranks",
    "columnwise_spearman",
    "config_key",
    "detection_scores",
    "linear_datamodeling_score",
    "load_model",
    "model_losses",
    "random_subsets",
    "retrain_on_subsets",
    "spearman",
    "subsample_and_retrain",
    "ssrt_self_influence",
    "ssrt_train_test_influence",
]
